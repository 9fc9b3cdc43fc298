project_id = "gannet-dev"
env        = "dev"
region     = "us-central1"

master_authorized_networks = [
  { cidr_block = "203.0.113.0/24", display_name = "office-vpn" },
]

gpu_max_nodes         = 2
sql_tier              = "db-custom-1-3840"
sql_availability_type = "ZONAL"

images_retention_days  = 7
results_retention_days = 30
deletion_protection    = false

# Delivery (.github/workflows/deliver.yml): the build job pushes here; prod's push
# identity may read, to promote the digest dev runs.
github_repository          = "gannet-team/gannet"
github_repository_owner_id = "123456789"
github_environment         = "dev"
build_pushes_here          = true
registry_readers           = ["serviceAccount:gannet-push@gannet-prod.iam.gserviceaccount.com"]
