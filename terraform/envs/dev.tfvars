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
