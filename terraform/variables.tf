variable "project_id" {
  description = "Google Cloud project that holds everything Gannet uses."
  type        = string
}

variable "env" {
  description = "Environment name (dev, prod); used in names and labels."
  type        = string
  validation {
    condition     = contains(["dev", "prod"], var.env)
    error_message = "env must be dev or prod."
  }
}

variable "region" {
  description = "Region of the cluster, Cloud SQL, buckets and Artifact Registry."
  type        = string
  default     = "us-central1"
}

variable "gpu_zones" {
  description = "Zones of var.region that offer NVIDIA T4 GPUs; the GPU pool spans them so spot capacity can come from any."
  type        = list(string)
  default     = ["us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"]
}

variable "master_authorized_networks" {
  description = "CIDR blocks allowed to reach the GKE control plane (office, VPN, CI runners)."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
}

variable "subnet_cidr" {
  description = "Primary range of the cluster subnet (nodes)."
  type        = string
  default     = "10.10.0.0/20"
}

variable "pods_cidr" {
  description = "Secondary range for pod IPs."
  type        = string
  default     = "10.20.0.0/14"
}

variable "services_cidr" {
  description = "Secondary range for Service IPs."
  type        = string
  default     = "10.30.0.0/20"
}

variable "master_cidr" {
  description = "/28 for the private control plane endpoint."
  type        = string
  default     = "172.16.0.0/28"
}

variable "sql_private_range" {
  description = "Range peered to Google's service network for Cloud SQL private IP; k8s/base/networkpolicy.yaml allows egress to it on 5432."
  type        = string
  default     = "10.60.0.0/16"
}

variable "system_machine_type" {
  description = "Machine type of the system pool (kube-system, GMP, adapters; dev's CPU worker)."
  type        = string
  default     = "e2-standard-4"
}

variable "system_max_nodes" {
  description = "Upper bound of the system pool per zone."
  type        = number
  default     = 3
}

variable "gpu_machine_type" {
  description = "Machine type that carries one T4 (N1 is the family T4s attach to)."
  type        = string
  default     = "n1-standard-8"
}

variable "gpu_max_nodes" {
  description = "Most T4 spot nodes the pool may add; keep it >= the HPA maxReplicas and within the regional T4 quota."
  type        = number
}

variable "sql_tier" {
  description = "Cloud SQL machine tier of the ENTERPRISE edition (sql.tf): db-custom-CPUS-MEMORY_MB or shared-core, not db-perf-optimized-*."
  type        = string
}

variable "sql_availability_type" {
  description = "ZONAL or REGIONAL (HA) Cloud SQL."
  type        = string
  default     = "ZONAL"
  validation {
    condition     = contains(["ZONAL", "REGIONAL"], var.sql_availability_type)
    error_message = "sql_availability_type: ZONAL or REGIONAL."
  }
}

variable "images_retention_days" {
  description = "Input images are deleted this many days after upload."
  type        = number
  default     = 30
}

variable "results_retention_days" {
  description = "Result JSON moves to Nearline after 30 days and is deleted after this many days."
  type        = number
  default     = 365
  validation {
    # Nearline bills 30 days at least: deleted sooner after the move, each object is
    # charged for the rest (early deletion).
    condition     = var.results_retention_days <= 30 || var.results_retention_days >= 60
    error_message = "results_retention_days: 30 or less (never Nearline), or 60 or more (30 days in Nearline)."
  }
}

variable "ack_deadline_seconds" {
  description = "The subscriptions' ack deadline, for pull clients other than the worker (gannet dead-letters, a backend's own tools): the worker's streaming pull sends its own, GANNET_STREAM_ACK_DEADLINE_S, and extends it while a task runs."
  type        = number
  default     = 60
  validation {
    condition     = var.ack_deadline_seconds >= 10 && var.ack_deadline_seconds <= 600
    error_message = "ack_deadline_seconds: Pub/Sub takes 10 to 600."
  }
}

variable "max_delivery_attempts" {
  description = "Deliveries before Pub/Sub moves a message to the dead-letter topic."
  type        = number
  default     = 5
  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "max_delivery_attempts: Pub/Sub takes 5 to 100."
  }
}

variable "dead_letter_alert_days" {
  description = "Days a dead letter may wait unhandled (replayed or acknowledged) before its Cloud Monitoring alert (alerts.tf) fires; Pub/Sub drops it at 31."
  type        = number
  default     = 3
  validation {
    condition     = var.dead_letter_alert_days > 0 && var.dead_letter_alert_days < 31
    error_message = "dead_letter_alert_days: more than 0 and less than 31 (Pub/Sub's retention)."
  }
}

variable "deletion_protection" {
  description = "Protect the cluster and the database from terraform destroy."
  type        = bool
  default     = true
}

variable "labels" {
  description = "Extra labels on every resource that takes labels."
  type        = map(string)
  default     = {}
}

variable "github_repository" {
  description = "OWNER/NAME of the GitHub repository whose delivery workflow may push and deploy here."
  type        = string
  validation {
    condition     = can(regex("^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$", var.github_repository))
    error_message = "github_repository is OWNER/NAME."
  }
}

variable "github_repository_owner_id" {
  description = "Numeric id of the repository's owner (gh api repos/OWNER/NAME --jq .owner.id); pins the trust to that owner."
  type        = string
  validation {
    condition     = can(regex("^[0-9]+$", var.github_repository_owner_id))
    error_message = "github_repository_owner_id is the owner's numeric id."
  }
}

variable "github_environment" {
  description = "GitHub environment whose jobs deploy here (its protection rules gate them)."
  type        = string
}

variable "build_pushes_here" {
  description = "Whether the workflow's build job (no environment) pushes to this repository: true for dev; prod receives images by promotion."
  type        = bool
  default     = false
}

variable "backend_members" {
  description = "The platform's backends that publish tasks (backends.tf): each may publish to every lane's topic, upload to the images bucket, read the dead letters and read result objects, for every tenant (docs/integrating.md, Access): never a tenant's own system. IAM members, e.g. serviceAccount:orders-api@PROJECT.iam.gserviceaccount.com."
  type        = list(string)
  default     = []
}

variable "registry_readers" {
  description = "Members that may pull from this repository besides the nodes, e.g. prod's gannet-push that promotes dev's digests."
  type        = list(string)
  default     = []
}

variable "extra_lanes" {
  description = "Lanes after the first (GANNET_LANES' names, in order): each gets gannet-tasks-NAME, gannet-tasks-sub-NAME and gannet-dead-letter-NAME (lanes.tf). The first lane is the resources in pubsub.tf."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for lane in var.extra_lanes : can(regex("^[a-z][a-z0-9]{0,19}$", lane))])
    error_message = "A lane name is lowercase letters and digits, at most 20, starting with a letter."
  }
}

variable "oldest_unacked_alert_s" {
  description = "The first lane's (interactive) oldest unacked message age, in seconds, past which its Cloud Monitoring alert (alerts.tf) fires, held 10 minutes."
  type        = number
  default     = 600
}

variable "extra_lane_oldest_unacked_alert_s" {
  description = "The same for each of extra_lanes (backfills, which may hold their oldest message an hour at maxReplicas)."
  type        = number
  default     = 3600
}

variable "alert_notification_channels" {
  description = "Cloud Monitoring notification channels (projects/P/notificationChannels/N) the alerts of alerts.tf page; empty: they show in the console's Alerting page only."
  type        = list(string)
  default     = []
}
