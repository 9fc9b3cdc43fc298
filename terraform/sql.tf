# PostgreSQL on a private IP only; the password lives in Secret Manager.
resource "google_sql_database_instance" "gannet" {
  # checkov:skip=CKV_GCP_6:ssl_mode ENCRYPTED_ONLY makes every connection TLS (sslmode=require); client certificates would need per-pod cert distribution on an instance with no public IP
  # checkov:skip=CKV2_GCP_13:log_duration logs every statement; with one transaction per message that dominates log cost, and slow queries show in Query Insights
  name                = local.name
  region              = var.region
  database_version    = "POSTGRES_18"
  deletion_protection = var.deletion_protection

  settings {
    # Set, not left to the API: for PostgreSQL 16 and later Cloud SQL defaults to
    # ENTERPRISE_PLUS, which takes only db-perf-optimized-N-* tiers, and the db-custom-*
    # tiers of envs/*.tfvars would fail at apply ("Invalid Tier ... for (ENTERPRISE_PLUS)
    # Edition"). tests/test_infra.py checks that each environment's tier fits it.
    edition                     = "ENTERPRISE"
    tier                        = var.sql_tier
    availability_type           = var.sql_availability_type
    disk_autoresize             = true
    deletion_protection_enabled = var.deletion_protection
    user_labels                 = local.labels

    ip_configuration {
      ipv4_enabled                                  = false
      private_network                               = google_compute_network.vpc.id
      ssl_mode                                      = "ENCRYPTED_ONLY"
      enable_private_path_for_google_cloud_services = true
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
      start_time                     = "03:00"
      backup_retention_settings {
        retained_backups = 14
      }
    }

    maintenance_window {
      day  = 7
      hour = 4
    }

    insights_config {
      query_insights_enabled = true
    }

    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    # pgAudit: the flag loads it, `CREATE EXTENSION pgaudit` in the database (once, as
    # the postgres user: docs/operating.md, step 7) turns it on, and pgaudit.log says
    # what it records: schema and role changes, not the per-task reads and writes.
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    database_flags {
      name  = "pgaudit.log"
      value = "ddl,role"
    }
  }

  depends_on = [google_service_networking_connection.sql]
}

resource "google_sql_database" "gannet" {
  name     = "gannet"
  instance = google_sql_database_instance.gannet.name
}

resource "random_password" "db" {
  length  = 32
  special = false
}

# The role that owns gannet's tables: `gannet db migrate` (the pods' init container,
# GANNET_OWNER_DATABASE_URL) and `gannet db purge`. Not a superuser.
resource "google_sql_user" "gannet" {
  name     = "gannet"
  instance = google_sql_database_instance.gannet.name
  password = random_password.db.result
  # It owns gannet's tables, and PostgreSQL refuses to drop a role that owns objects:
  # a destroy (dev's) failed here. The instance's deletion takes the role with it.
  deletion_policy = "ABANDON"
}

resource "google_secret_manager_secret" "db_password" {
  secret_id = "gannet-db-password"
  labels    = local.labels
  replication {
    auto {}
  }
  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "db_password" {
  secret      = google_secret_manager_secret.db_password.id
  secret_data = random_password.db.result
}

# The daemon's role, gannet_worker (GANNET_DATABASE_URL), has only a password here:
# `gannet db migrate` makes it as gannet, from the URL, and grants it reading, adding
# and updating rows. Not a google_sql_user: Cloud SQL makes those members of
# cloudsqlsuperuser, with CREATEROLE and CREATEDB; where that role owns the database
# (and so its schema public), such a member may drop gannet's tables or replace them
# with tables of its own, without row-level security.
resource "random_password" "db_worker" {
  length  = 32
  special = false
}

resource "google_secret_manager_secret" "db_worker_password" {
  secret_id = "gannet-db-worker-password"
  labels    = local.labels
  replication {
    auto {}
  }
  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "db_worker_password" {
  secret      = google_secret_manager_secret.db_worker_password.id
  secret_data = random_password.db_worker.result
}
