//! Times the reconciler on a real kernel: N services x M destinations applied from empty, then
//! a no-change resync (which must write nothing), then removal. Prints one line per phase.
//!
//!   ipvs-bench [SERVICES] [DESTINATIONS]     (default 1000 16)
//!
//! Uses services on 10.254.0.0/16 only (TCP port 80, mh) and removes them at the end.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use ipvs::{
    DesiredService, Destination, ForwardMethod, IpvsClient, Reconciler, Service, ServiceFlags,
    ServiceKey,
};
use tokio::time::Instant;

fn owned(key: &ServiceKey) -> bool {
    matches!(key, ServiceKey::Addr { addr: SocketAddr::V4(a), .. } if a.ip().octets()[..2] == [10, 254])
}

fn desired(services: u32, dests: u32) -> Vec<DesiredService> {
    (0..services)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 254, 0, 0)) + i);
            let key = ServiceKey::tcp(SocketAddr::new(vip.into(), 80));
            DesiredService {
                service: Service::new(key, "mh")
                    .with_flags(ServiceFlags::FALLBACK | ServiceFlags::PORT),
                destinations: (0..dests)
                    .map(|j| {
                        let rs = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 253, 0, 1)) + j);
                        Destination::new(
                            SocketAddr::new(rs.into(), 80),
                            ForwardMethod::Masquerade,
                            1,
                        )
                    })
                    .collect(),
            }
        })
        .collect()
}

async fn run(services: u32, dests: u32) -> Result<(), Box<dyn std::error::Error>> {
    let client = IpvsClient::connect().await?;
    let r = Reconciler::new(client.clone(), owned);
    r.reconcile(&[]).await?; // leftovers of an earlier run
    let want = desired(services, dests);

    let (w, t) = (client.writes_sent(), Instant::now());
    let first = r.reconcile(&want).await?;
    let apply = t.elapsed();
    if !first.errors.is_empty() {
        return Err(format!(
            "{} writes failed, first: {}",
            first.errors.len(),
            first.errors[0].error
        )
        .into());
    }
    println!(
        "apply from empty: {services} services x {dests} destinations, {} writes in {:.3} s",
        client.writes_sent() - w,
        apply.as_secs_f64()
    );

    let (w, t) = (client.writes_sent(), Instant::now());
    let second = r.reconcile(&want).await?;
    let resync = t.elapsed();
    println!(
        "no-change resync: {} planned, {} writes in {:.3} s",
        second.ops.len(),
        client.writes_sent() - w,
        resync.as_secs_f64()
    );
    if !second.ops.is_empty() || client.writes_sent() != w {
        return Err("the no-change resync wrote something".into());
    }

    let t = Instant::now();
    let last = r.reconcile(&[]).await?;
    println!(
        "remove all: {} writes in {:.3} s",
        last.ops.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>());
    let services = match args.next().unwrap_or(Ok(1000)) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ipvs-bench: SERVICES: {e}");
            return ExitCode::from(2);
        }
    };
    let dests = match args.next().unwrap_or(Ok(16)) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ipvs-bench: DESTINATIONS: {e}");
            return ExitCode::from(2);
        }
    };
    match run(services, dests).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipvs-bench: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
