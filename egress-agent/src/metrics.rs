//! Prometheus metrics, /healthz and /readyz. Placeholder until the metrics endpoint lands.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;

use crate::{agent::Report, datapath::PinLayout};

pub async fn serve(
    _address: SocketAddr,
    _reports: watch::Receiver<Arc<Report>>,
    _pins: PinLayout,
) -> anyhow::Result<()> {
    Ok(())
}
