//! The Kubernetes API source (kube-rs reflectors) and the policy status writer.
//! Placeholder until the Kubernetes source lands: `--kubernetes` fails clearly.

use std::{path::Path, sync::Arc};

use tokio::sync::watch;

use crate::{agent::Report, source::Snapshot};

#[derive(Clone)]
pub struct Client;

pub async fn client(_kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    anyhow::bail!("--kubernetes is not supported by this build yet")
}

pub async fn source(_client: Client) -> anyhow::Result<watch::Receiver<Arc<Snapshot>>> {
    anyhow::bail!("--kubernetes is not supported by this build yet")
}

pub fn spawn_status_writer(_client: Client, _reports: watch::Receiver<Arc<Report>>) {}
