//! Smoke test of the IPVS client and reconciler against a real kernel (run in the VM by the
//! harness, next to `ipvsadm -Ln`). Creates TCP 10.255.0.1:80 (mh, mh-fallback + mh-port) with
//! two destinations, reads them back, reconciles a desired state twice (the second pass must
//! plan and write nothing), deletes everything it made and exits non-zero on any mismatch.
//!
//! It only touches services on 10.255.0.1; leftovers from an earlier run are removed first.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use ipvs::reconcile::{dump, plan};
use ipvs::{
    DesiredService, Destination, ForwardMethod, IpvsClient, Reconciler, Service, ServiceFlags,
    ServiceKey,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn owned(key: &ServiceKey) -> bool {
    matches!(key, ServiceKey::Addr { addr, .. } if addr.ip() == IpAddr::V4(VIP))
}

fn check(ok: bool, what: impl Into<String>) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(what.into().into())
    }
}

fn real(last: u8, weight: u32) -> Destination {
    Destination::new(
        SocketAddr::new(Ipv4Addr::new(10, 255, 1, last).into(), 80),
        ForwardMethod::Masquerade,
        weight,
    )
}

async fn run() -> Result<()> {
    let client = IpvsClient::connect().await?;
    let info = client.info().await?;
    println!(
        "IPVS {} (conn table {}), family id {}",
        info.version_string(),
        info.conn_tab_size,
        client.family_id()
    );

    // Start clean (an earlier run may have been killed half-way).
    for e in client.services().await? {
        if owned(&e.service.key) {
            client.del_service(&e.service.key).await?;
        }
    }

    let key = ServiceKey::tcp(SocketAddr::new(VIP.into(), 80));
    let svc = Service::new(key, "mh").with_flags(ServiceFlags::FALLBACK | ServiceFlags::PORT);
    client.new_service(&svc).await?;
    for d in [real(1, 1), real(2, 1)] {
        client.new_dest(&key, &d).await?;
    }

    println!("-- after direct writes:");
    let services = client.services().await?;
    let mine: Vec<_> = services.iter().filter(|e| owned(&e.service.key)).collect();
    check(
        mine.len() == 1,
        format!("expected 1 service on {VIP}, dump has {}", mine.len()),
    )?;
    check(
        mine[0].service == svc,
        format!("read back {:?}, wrote {:?}", mine[0].service, svc),
    )?;
    let dests = client.dests(&key).await?;
    let e = mine[0];
    println!(
        "{} {} flags {:#x}",
        e.service.key,
        e.service.scheduler,
        e.service.flags.bits()
    );
    for d in &dests {
        println!(
            "  -> {} {} weight {} active {} inactive {}",
            d.destination.addr,
            d.destination.forward,
            d.destination.weight,
            d.active_conns,
            d.inactive_conns
        );
    }
    let mut got: Vec<_> = dests.iter().map(|d| d.destination.clone()).collect();
    got.sort_by_key(|d| d.addr);
    check(
        got == vec![real(1, 1), real(2, 1)],
        format!("destinations read back as {got:?}"),
    )?;

    // Desired: quiesce .1, keep .2, add .3 and .4; expect 1 SET_DEST + 2 NEW_DEST.
    let desired = vec![DesiredService {
        service: svc.clone(),
        destinations: vec![real(4, 1), real(2, 1), real(1, 0), real(3, 1)],
    }];
    let reconciler = Reconciler::new(client.clone(), owned);
    let writes0 = client.writes_sent();
    let first = reconciler.reconcile(&desired).await?;
    for op in &first.ops {
        println!("applied: {op}");
    }
    check(
        first.errors.is_empty(),
        format!("first pass errors: {:?}", first.errors),
    )?;
    check(
        first.ops.len() == 3,
        format!("first pass planned {} ops, expected 3", first.ops.len()),
    )?;
    check(
        client.writes_sent() - writes0 == 3,
        "first pass did not send exactly 3 writes",
    )?;

    let writes1 = client.writes_sent();
    let second = reconciler.reconcile(&desired).await?;
    check(
        second.ops.is_empty(),
        format!("second pass planned {:?}", second.ops),
    )?;
    check(client.writes_sent() == writes1, "second pass sent writes")?;
    let current = dump(&client, owned).await?;
    check(
        plan(&desired, &current, owned).is_empty(),
        "plan against a fresh dump is not empty",
    )?;
    println!("second pass: no changes, no writes");

    // Remove everything through the reconciler, then check the kernel is clean.
    let last = reconciler.reconcile(&[]).await?;
    check(
        last.errors.is_empty(),
        format!("cleanup errors: {:?}", last.errors),
    )?;
    check(
        client.service(&key).await?.is_none(),
        "service still present after cleanup",
    )?;
    println!("cleanup: done");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => {
            println!("ipvs-smoke: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ipvs-smoke: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
