resource "google_compute_network" "vpc" {
  name                    = local.name
  auto_create_subnetworks = false
  depends_on              = [google_project_service.apis]
}

# Explicit, logged baseline: nothing reaches the nodes unless a rule (GKE's own
# control-plane and health-check rules, at higher priority) allows it.
resource "google_compute_firewall" "deny_ingress" {
  name      = "${local.name}-deny-ingress"
  network   = google_compute_network.vpc.id
  direction = "INGRESS"
  priority  = 65000
  deny {
    protocol = "all"
  }
  source_ranges = ["0.0.0.0/0"]
  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# The private control plane reaches nodes and pods only on 443 and 10250 (GKE's own
# rule). The KEDA overlay needs two more pod ports: its metrics API server (6443), which
# serves the External metrics of the HPA that KEDA creates, and its admission webhooks
# (9443). Without them that HPA reads no metric and the worker never scales.
resource "google_compute_firewall" "control_plane_to_keda" {
  name                    = "${local.name}-control-plane-keda"
  network                 = google_compute_network.vpc.id
  direction               = "INGRESS"
  priority                = 1000
  source_ranges           = [var.master_cidr]
  target_service_accounts = [google_service_account.nodes.email]
  allow {
    protocol = "tcp"
    ports    = ["6443", "9443"]
  }
  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_subnetwork" "nodes" {
  name                     = "${local.name}-nodes"
  region                   = var.region
  network                  = google_compute_network.vpc.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.pods_cidr
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.services_cidr
  }

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Private nodes reach the internet (HTTPS result callbacks) through Cloud NAT.
resource "google_compute_router" "nat" {
  name    = "${local.name}-nat"
  region  = var.region
  network = google_compute_network.vpc.id
}

resource "google_compute_router_nat" "nat" {
  name                               = "${local.name}-nat"
  router                             = google_compute_router.nat.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# Cloud SQL private IP: a range peered with Google's service producer network.
resource "google_compute_global_address" "sql" {
  name          = "${local.name}-sql"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  address       = split("/", var.sql_private_range)[0]
  prefix_length = tonumber(split("/", var.sql_private_range)[1])
  network       = google_compute_network.vpc.id
}

resource "google_service_networking_connection" "sql" {
  network                 = google_compute_network.vpc.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.sql.name]
  # The peering cannot be removed while the producer (Cloud SQL) still holds it after
  # the instance's deletion: destroy left it, and failed, instead of abandoning it.
  deletion_policy = "ABANDON"
}
