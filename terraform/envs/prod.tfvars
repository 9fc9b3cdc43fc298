project_id = "gannet-prod"
env        = "prod"
region     = "us-central1"

master_authorized_networks = [
  { cidr_block = "203.0.113.0/24", display_name = "office-vpn" },
  { cidr_block = "198.51.100.0/24", display_name = "ci-runners" },
]

# >= maxReplicas of the prod HPA (12), with headroom for a surge pod during rollouts;
# request a regional T4 quota of at least this many.
gpu_max_nodes         = 14
system_max_nodes      = 3
sql_tier              = "db-custom-4-16384"
sql_availability_type = "REGIONAL"

images_retention_days  = 30
results_retention_days = 365
deletion_protection    = true

# Delivery (.github/workflows/deliver.yml): images arrive by promotion from dev, in the
# prod environment's job, after its reviewer approved.
github_repository          = "gannet-team/gannet"
github_repository_owner_id = "123456789"
github_environment         = "prod"

# The lanes after the first, as in the prod overlay's GANNET_LANES (interactive, bulk).
extra_lanes = ["bulk"]
