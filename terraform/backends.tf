# What a backend needs to use the worker (docs/integrating.md): publish tasks to every
# lane's topic, upload images, read and acknowledge its dead letters, read result
# objects. The rows are PostgreSQL's (a reader role per backend, integrating.md). Each of
# backend_members gets these, for every tenant (nothing here is scoped to a tenant's
# prefix: a publisher speaks for any tenant anyway); none by default, and without them a
# backend's first publish is PERMISSION_DENIED.
locals {
  # Lane names ("first-lane", never a lane name, for the unsuffixed first lane), known at plan
  # time: the bindings are keyed by them and the member, not by ids made at apply.
  backend_lanes = concat(["first-lane"], var.extra_lanes)
  backend_pairs = { for pair in setproduct(var.backend_members, local.backend_lanes) :
  "${pair[0]} ${pair[1]}" => { member = pair[0], lane = pair[1] } }
}

resource "google_pubsub_topic_iam_member" "backend_publishes" {
  for_each = local.backend_pairs
  topic    = each.value.lane == "first-lane" ? google_pubsub_topic.tasks.id : google_pubsub_topic.lane[each.value.lane].id
  role     = "roles/pubsub.publisher"
  member   = each.value.member
}

resource "google_pubsub_subscription_iam_member" "backend_reads_dead_letters" {
  for_each     = local.backend_pairs
  subscription = each.value.lane == "first-lane" ? google_pubsub_subscription.dead_letter.id : google_pubsub_subscription.lane_dead_letter[each.value.lane].id
  role         = "roles/pubsub.subscriber"
  member       = each.value.member
}

resource "google_storage_bucket_iam_member" "backend_uploads_images" {
  for_each = toset(var.backend_members)
  bucket   = google_storage_bucket.images.name
  role     = "roles/storage.objectCreator"
  member   = each.value
}

resource "google_storage_bucket_iam_member" "backend_reads_results" {
  for_each = toset(var.backend_members)
  bucket   = google_storage_bucket.results.name
  role     = "roles/storage.objectViewer"
  member   = each.value
}
