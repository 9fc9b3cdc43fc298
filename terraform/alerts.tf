# Alerts that need no worker pod. k8s/base/rules.yaml reads what the pods export, so
# when no pod is scraped (every one Pending for want of a spot T4, crash-looping before
# /metrics answers, or the KEDA overlay at zero failing to wake) none of its alerts
# fires. Cloud Monitoring reads Pub/Sub's own figure: a lane's oldest unacked message,
# and a dead-letter subscription's.
locals {
  # Each lane's subscription and the age its alert fires at (the first lane's is the
  # interactive one; later lanes are backfills, which may hold a message an hour).
  lane_oldest_alerts = merge(
    { (google_pubsub_subscription.tasks.name) = var.oldest_unacked_alert_s },
    { for lane in var.extra_lanes :
    google_pubsub_subscription.lane[lane].name => var.extra_lane_oldest_unacked_alert_s },
  )
}

resource "google_monitoring_alert_policy" "oldest_unacked" {
  for_each     = local.lane_oldest_alerts
  display_name = "GannetOldestUnackedMessageTooOld: ${each.key}"
  combiner     = "OR"
  conditions {
    display_name = "${each.key}: oldest unacked message over ${each.value} s for 10 minutes"
    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${each.key}\" AND metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\""
      comparison      = "COMPARISON_GT"
      threshold_value = each.value
      duration        = "600s"
      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
      trigger {
        count = 1
      }
    }
  }
  notification_channels = var.alert_notification_channels
  documentation {
    mime_type = "text/markdown"
    content   = "A Gannet lane is not keeping up, or one message keeps failing and coming back. What to do: docs/runbook.md#gannetoldestunackedmessagetooold."
  }
  user_labels = local.labels
  depends_on  = [google_project_service.apis]
}

# Dead letters left unhandled: Pub/Sub drops a message 31 days after it arrived
# (the dead-letter subscriptions' retention), and a task whose retries ran out (an
# outage longer than its attempts) has no row: unreplayed, it is lost. Nothing else
# tells of those (GannetDeadLetters counts only what the daemon quarantined).
locals {
  dead_letter_subscriptions = concat(
    [google_pubsub_subscription.dead_letter.name],
    [for lane in var.extra_lanes : google_pubsub_subscription.lane_dead_letter[lane].name],
  )
}

resource "google_monitoring_alert_policy" "dead_letters_unhandled" {
  for_each     = toset(local.dead_letter_subscriptions)
  display_name = "GannetDeadLettersUnhandled: ${each.key}"
  combiner     = "OR"
  conditions {
    display_name = "${each.key}: a dead letter unhandled for over ${var.dead_letter_alert_days} days"
    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${each.key}\" AND metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.dead_letter_alert_days * 86400
      duration        = "600s"
      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
      trigger {
        count = 1
      }
    }
  }
  notification_channels = var.alert_notification_channels
  documentation {
    mime_type = "text/markdown"
    content   = "Dead letters wait to be replayed or acknowledged; Pub/Sub drops them 31 days after they arrived. What to do: docs/runbook.md#gannetdeadlettersunhandled."
  }
  user_labels = local.labels
  depends_on  = [google_project_service.apis]
}
