# GKE Standard: Workload Identity, Managed Service for Prometheus, Dataplane V2
# (NetworkPolicy enforcement), private nodes. Two pools: system (always on) and a T4
# spot pool that scales from 0.
resource "google_container_cluster" "gannet" {
  # checkov:skip=CKV_GCP_65:RBAC is granted per user with IAM roles; Google Groups for RBAC needs a Workspace security group, add authenticator_groups_config once the org has one
  name     = local.name
  location = var.region

  network         = google_compute_network.vpc.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }
  # Dataplane V2 enforces NetworkPolicy itself; the Calico add-on stays off.
  datapath_provider = "ADVANCED_DATAPATH"
  network_policy {
    enabled = false
  }
  enable_intranode_visibility = true

  # Pools are managed below; the default pool is created and removed at once.
  remove_default_node_pool = true
  initial_node_count       = 1

  release_channel {
    channel = "REGULAR"
  }

  workload_identity_config {
    workload_pool = local.workload_pool
  }

  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true
    }
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }

  # Scale down empty GPU nodes sooner than the balanced profile: the simulation
  # (`gannet scaling simulate --sweep node_scale_down_s=60,600`) shows idle T4 nodes
  # lingering after a burst are the largest avoidable share of GPU-hours.
  cluster_autoscaling {
    autoscaling_profile = "OPTIMIZE_UTILIZATION"
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.master_cidr
  }

  # The delivery workflow reaches the control plane by its DNS name, authorized by IAM
  # (container.clusters.connect) instead of by source IP: GitHub-hosted runners have no
  # fixed addresses to list in master_authorized_networks.
  control_plane_endpoints_config {
    dns_endpoint_config {
      allow_external_traffic = true
    }
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  enable_shielded_nodes = true
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  node_config {
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }
  }

  resource_labels     = local.labels
  deletion_protection = var.deletion_protection

  depends_on = [google_project_service.apis]
}

resource "google_container_node_pool" "system" {
  name     = "system"
  cluster  = google_container_cluster.gannet.id
  location = var.region

  autoscaling {
    min_node_count = 1
    max_node_count = var.system_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.system_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = 100
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels = {
      "gannet.io/pool" = "system"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }
    resource_labels = local.labels
  }
}

# One T4 per node, spot, from 0 to var.gpu_max_nodes across the T4 zones. The taints
# keep everything but the worker (which tolerates them in k8s/overlays/prod) off.
resource "google_container_node_pool" "gpu_t4_spot" {
  name           = "gpu-t4-spot"
  cluster        = google_container_cluster.gannet.id
  location       = var.region
  node_locations = var.gpu_zones

  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.gpu_max_nodes
    # Take spot T4s from whichever zone has them, not an even spread.
    location_policy = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  # A surge node costs a GPU; replace in place instead.
  upgrade_settings {
    max_surge       = 0
    max_unavailable = 1
  }

  node_config {
    machine_type    = var.gpu_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = 100
    spot            = true
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = "nvidia-tesla-t4"
      count = 1
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    labels = {
      "gannet.io/pool" = "gpu-t4"
    }
    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }
    taint {
      key    = "cloud.google.com/gke-spot"
      value  = "true"
      effect = "NO_SCHEDULE"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }
    resource_labels = local.labels
  }
}
