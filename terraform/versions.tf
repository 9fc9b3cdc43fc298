terraform {
  required_version = ">= 1.6"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.14, < 8.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # State lives in a GCS bucket created once by hand (see docs/operating.md):
  #   terraform init -backend-config="bucket=PROJECT-tfstate" -backend-config="prefix=gannet"
  backend "gcs" {}
}

provider "google" {
  project = var.project_id
  region  = var.region
}
