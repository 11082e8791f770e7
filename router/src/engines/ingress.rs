//! The ingress engine: IPVS virtual servers with real-server health checks
//! ([`crate::ingress`]) and the status board entry `ingress`. Services exist on every router
//! whatever its VRRP role: only the VIPs move on failover.

use std::collections::BTreeSet;
use std::net::IpAddr;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::config::Config;
use crate::ingress::{self, EngineSettings, IngressMetrics};

/// The addresses whose IPVS services the ingress engine of `cfg` owns (None without an
/// `ingress` section, or when it cannot be planned).
pub(super) fn owned(cfg: &Config) -> Option<BTreeSet<IpAddr>> {
    let i = cfg.ingress.as_ref()?;
    let plan = ingress::plan(i, cfg.gateways.as_ref()).ok()?;
    Some(plan.with_owned(vrrp_vips(cfg)).owned_addresses())
}

fn vrrp_vips(cfg: &Config) -> impl Iterator<Item = IpAddr> + '_ {
    cfg.vrrp
        .iter()
        .flat_map(|v| v.virtual_ips.iter().map(|x| x.address.value.addr()))
}

/// Starts the checkers and the IPVS reconciler for `cfg.ingress` (nothing when absent).
/// `owned_before` is what the engine it replaces owned: services on addresses that left the
/// config (a removed gateway's ingress VIP) are deleted by the new one.
pub(super) fn start(
    cfg: &Config,
    owned_before: Option<&BTreeSet<IpAddr>>,
    shared: &Shared,
    metrics: &IngressMetrics,
    cancel: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, String> {
    let Some(i) = &cfg.ingress else {
        return Ok(Vec::new());
    };
    // Services on the VIPs this daemon holds are ours: a virtual server removed from the
    // config (say DNS on the egress VIP) takes its services with it.
    let plan = ingress::plan(i, cfg.gateways.as_ref())
        .map_err(|e| e.to_string())?
        .with_owned(vrrp_vips(cfg))
        .with_owned(owned_before.into_iter().flatten().copied());
    tracing::info!(
        virtual_servers = plan.virtual_servers.len(),
        services = plan
            .virtual_servers
            .iter()
            .map(|v| v.services.len())
            .sum::<usize>(),
        real_servers = plan.real_servers().len(),
        "ingress: checks and IPVS reconciler started"
    );
    Ok(ingress::start(
        plan,
        EngineSettings::default(),
        shared.board.clone(),
        metrics.clone(),
        cancel,
    ))
}
