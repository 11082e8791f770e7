use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::model::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn vip_key(port: u16) -> ServiceKey {
    ServiceKey::tcp(SocketAddr::new("192.168.26.128".parse().unwrap(), port))
}

fn mh(key: ServiceKey) -> Service {
    Service::new(key, "mh").with_flags(ServiceFlags::FALLBACK | ServiceFlags::PORT)
}

fn dest(addr: &str, weight: u32) -> Destination {
    Destination::new(sa(addr), ForwardMethod::Masquerade, weight)
}

fn desired(service: Service, dests: Vec<Destination>) -> DesiredService {
    DesiredService {
        service,
        destinations: dests,
    }
}

/// What the kernel would hold after applying `ops` to `current` (a tiny IPVS model), so tests
/// can check that a second pass plans nothing.
fn simulate(current: &[KernelService], ops: &[Op]) -> Vec<KernelService> {
    let mut state: Vec<KernelService> = current.to_vec();
    for op in ops {
        match op {
            Op::NewService(s) => {
                assert!(state.iter().all(|k| k.service.key != s.key), "{op}: exists");
                state.push(KernelService {
                    service: s.clone(),
                    destinations: vec![],
                });
            }
            Op::SetService(s) => {
                let k = state
                    .iter_mut()
                    .find(|k| k.service.key == s.key)
                    .expect("set: no service");
                k.service = s.clone();
            }
            Op::DelService(key) => {
                let before = state.len();
                state.retain(|k| k.service.key != *key);
                assert_eq!(before, state.len() + 1, "{op}: no such service");
            }
            Op::NewDest { service, dest } => {
                let k = state
                    .iter_mut()
                    .find(|k| k.service.key == *service)
                    .expect("no service");
                assert!(
                    k.destinations.iter().all(|d| d.addr != dest.addr),
                    "{op}: exists"
                );
                // The kernel puts a new destination at the head of its list.
                k.destinations.insert(0, dest.clone());
            }
            Op::SetDest { service, dest } => {
                let k = state
                    .iter_mut()
                    .find(|k| k.service.key == *service)
                    .expect("no service");
                let d = k
                    .destinations
                    .iter_mut()
                    .find(|d| d.addr == dest.addr)
                    .expect("no dest");
                *d = dest.clone();
            }
            Op::DelDest { service, addr } => {
                let k = state
                    .iter_mut()
                    .find(|k| k.service.key == *service)
                    .expect("no service");
                let before = k.destinations.len();
                k.destinations.retain(|d| d.addr != *addr);
                assert_eq!(before, k.destinations.len() + 1, "{op}: no such dest");
            }
        }
    }
    state
}

fn all(_: &ServiceKey) -> bool {
    true
}

fn converge(
    desired: &[DesiredService],
    current: &[KernelService],
) -> (Vec<Op>, Vec<KernelService>) {
    let ops = plan(desired, current, all);
    let after = simulate(current, &ops);
    assert_eq!(
        plan(desired, &after, all),
        vec![],
        "second pass must be empty"
    );
    (ops, after)
}

#[test]
fn from_empty_services_first_then_sorted_destinations() {
    let want = vec![
        desired(
            mh(vip_key(7777)),
            vec![dest("192.168.27.18:7777", 1), dest("192.168.27.17:7777", 1)],
        ),
        desired(
            mh(vip_key(6666)),
            // Deliberately unsorted: .10 sorts after .3 numerically, before it as a string.
            vec![
                dest("192.168.27.10:6666", 1),
                dest("192.168.27.3:6666", 1),
                dest("192.168.27.3:6000", 1),
            ],
        ),
    ];
    let (ops, _) = converge(&want, &[]);
    let s6666 = vip_key(6666);
    let s7777 = vip_key(7777);
    assert_eq!(
        ops,
        vec![
            Op::NewService(mh(s6666)),
            Op::NewService(mh(s7777)),
            Op::NewDest {
                service: s6666,
                dest: dest("192.168.27.3:6000", 1)
            },
            Op::NewDest {
                service: s6666,
                dest: dest("192.168.27.3:6666", 1)
            },
            Op::NewDest {
                service: s6666,
                dest: dest("192.168.27.10:6666", 1)
            },
            Op::NewDest {
                service: s7777,
                dest: dest("192.168.27.17:7777", 1)
            },
            Op::NewDest {
                service: s7777,
                dest: dest("192.168.27.18:7777", 1)
            },
        ]
    );
}

#[test]
fn no_change_plans_nothing() {
    let want = vec![desired(
        mh(vip_key(6666)),
        vec![dest("192.168.27.3:6666", 1)],
    )];
    let current = vec![KernelService {
        service: mh(vip_key(6666)),
        destinations: vec![dest("192.168.27.3:6666", 1)],
    }];
    assert_eq!(plan(&want, &current, all), vec![]);
}

#[test]
fn kernel_hashed_flag_is_not_a_change() {
    let want = vec![desired(mh(vip_key(6666)), vec![])];
    let mut svc = mh(vip_key(6666));
    svc.flags = svc.flags | ServiceFlags::HASHED;
    let current = vec![KernelService {
        service: svc,
        destinations: vec![],
    }];
    assert_eq!(plan(&want, &current, all), vec![]);
}

#[test]
fn from_partial_state() {
    let key = vip_key(6666);
    let want = vec![desired(
        mh(key),
        vec![
            dest("192.168.27.1:6666", 1),
            dest("192.168.27.2:6666", 1),
            dest("192.168.27.3:6666", 1),
        ],
    )];
    let current = vec![KernelService {
        service: mh(key),
        destinations: vec![dest("192.168.27.2:6666", 1)],
    }];
    // mh: .2 sorts after the new .1, so it is re-inserted to keep the list in fresh-build
    // order (see mh_list_after_churn_matches_a_fresh_build).
    let (ops, _) = converge(&want, &current);
    assert_eq!(
        ops,
        vec![
            Op::DelDest {
                service: key,
                addr: sa("192.168.27.2:6666")
            },
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.1:6666", 1)
            },
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.2:6666", 1)
            },
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.3:6666", 1)
            },
        ]
    );
    // Any other scheduler just adds the missing ones.
    let rr = |d| desired(Service::new(key, "rr"), d);
    let want_rr = vec![rr(want[0].destinations.clone())];
    let current_rr = vec![KernelService {
        service: Service::new(key, "rr"),
        destinations: vec![dest("192.168.27.2:6666", 1)],
    }];
    let (ops, _) = converge(&want_rr, &current_rr);
    assert_eq!(ops.len(), 2);
}

#[test]
fn weight_change_is_set_dest_only() {
    let key = vip_key(6666);
    let want = vec![desired(
        mh(key),
        vec![dest("192.168.27.1:6666", 0), dest("192.168.27.2:6666", 1)],
    )];
    let current = vec![KernelService {
        service: mh(key),
        destinations: vec![dest("192.168.27.2:6666", 1), dest("192.168.27.1:6666", 1)],
    }];
    let (ops, _) = converge(&want, &current);
    assert_eq!(
        ops,
        vec![Op::SetDest {
            service: key,
            dest: dest("192.168.27.1:6666", 0)
        }]
    );
}

#[test]
fn forward_method_and_threshold_changes_are_set_dest() {
    let key = vip_key(6666);
    let mut d = dest("192.168.27.1:6666", 1);
    d.forward = ForwardMethod::Route;
    d.upper_threshold = 50;
    let want = vec![desired(mh(key), vec![d.clone()])];
    let current = vec![KernelService {
        service: mh(key),
        destinations: vec![dest("192.168.27.1:6666", 1)],
    }];
    let (ops, _) = converge(&want, &current);
    assert_eq!(
        ops,
        vec![Op::SetDest {
            service: key,
            dest: d
        }]
    );
}

#[test]
fn tunnel_defaults_match_what_the_kernel_reports() {
    let key = vip_key(6666);
    let want_d = Destination::new(sa("10.0.0.1:6666"), ForwardMethod::Tunnel, 1);
    let mut kernel_d = want_d.clone();
    kernel_d.tunnel = Some(Tunnel {
        kind: TunnelType::Ipip,
        port: 0,
        flags: 0,
    });
    let want = vec![desired(mh(key), vec![want_d])];
    let current = vec![KernelService {
        service: mh(key),
        destinations: vec![kernel_d],
    }];
    assert_eq!(plan(&want, &current, all), vec![]);
}

#[test]
fn destinations_added_before_removals() {
    let key = vip_key(6666);
    let want = vec![desired(
        mh(key),
        vec![dest("192.168.27.9:6666", 1), dest("192.168.27.4:6666", 1)],
    )];
    let current = vec![KernelService {
        service: mh(key),
        destinations: vec![dest("192.168.27.1:6666", 1), dest("192.168.27.4:6666", 1)],
    }];
    let (ops, _) = converge(&want, &current);
    assert_eq!(
        ops,
        vec![
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.9:6666", 1)
            },
            Op::DelDest {
                service: key,
                addr: sa("192.168.27.1:6666")
            },
        ]
    );
}

#[test]
fn scheduler_change_is_set_service_but_key_change_is_a_new_service() {
    let old = mh(vip_key(6666));
    let mut rr = old.clone();
    rr.scheduler = "rr".into();
    rr.flags = ServiceFlags::empty();
    let current = vec![KernelService {
        service: old.clone(),
        destinations: vec![dest("192.168.27.1:6666", 1)],
    }];
    let want = vec![desired(rr.clone(), vec![dest("192.168.27.1:6666", 1)])];
    let (ops, _) = converge(&want, &current);
    assert_eq!(ops, vec![Op::SetService(rr)]);

    // Same VIP and port but UDP: another service; the TCP one goes, last.
    let udp = Service::new(ServiceKey::udp(sa("192.168.26.128:6666")), "mh");
    let want = vec![desired(udp.clone(), vec![dest("192.168.27.1:6666", 1)])];
    let (ops, _) = converge(&want, &current);
    assert_eq!(
        ops,
        vec![
            Op::NewService(udp.clone()),
            Op::NewDest {
                service: udp.key,
                dest: dest("192.168.27.1:6666", 1)
            },
            Op::DelService(old.key),
        ]
    );
}

#[test]
fn persistence_and_netmask_changes_are_set_service() {
    let base = mh(vip_key(6666));
    let mut persistent = base.clone();
    persistent.flags = persistent.flags | ServiceFlags::PERSISTENT;
    persistent.timeout = 300;
    persistent.netmask = Netmask::V4("255.255.255.0".parse().unwrap());
    let current = vec![KernelService {
        service: base,
        destinations: vec![],
    }];
    let (ops, _) = converge(&[desired(persistent.clone(), vec![])], &current);
    assert_eq!(ops, vec![Op::SetService(persistent)]);
}

#[test]
fn foreign_services_are_untouched() {
    let ours: IpAddr = "192.168.26.128".parse().unwrap();
    let owned = |k: &ServiceKey| matches!(k, ServiceKey::Addr { addr, .. } if addr.ip() == ours);
    let foreign = KernelService {
        service: Service::new(ServiceKey::tcp(sa("10.9.9.9:80")), "wlc"),
        destinations: vec![dest("10.9.9.10:80", 1)],
    };
    let foreign_fwm = KernelService {
        service: Service::new(
            ServiceKey::Fwmark {
                af: AddressFamily::Inet,
                mark: 1,
            },
            "rr",
        ),
        destinations: vec![],
    };
    let stale_ours = KernelService {
        service: mh(vip_key(9999)),
        destinations: vec![],
    };
    let current = vec![foreign.clone(), foreign_fwm, stale_ours];
    let want = vec![
        desired(mh(vip_key(6666)), vec![dest("192.168.27.3:6666", 1)]),
        // Desired but not owned: ignored rather than fought over.
        desired(
            Service::new(ServiceKey::tcp(sa("10.9.9.9:80")), "rr"),
            vec![],
        ),
    ];
    let ops = plan(&want, &current, owned);
    assert_eq!(
        ops,
        vec![
            Op::NewService(mh(vip_key(6666))),
            Op::NewDest {
                service: vip_key(6666),
                dest: dest("192.168.27.3:6666", 1)
            },
            Op::DelService(vip_key(9999)),
        ]
    );
    for op in &ops {
        let key = match op {
            Op::NewService(s) | Op::SetService(s) => s.key,
            Op::DelService(k) => *k,
            Op::NewDest { service, .. }
            | Op::SetDest { service, .. }
            | Op::DelDest { service, .. } => *service,
        };
        assert!(owned(&key), "{op} touches a foreign service");
    }
    let after = simulate(&current, &ops);
    assert!(after.contains(&foreign));
    assert_eq!(plan(&want, &after, owned), vec![]);
}

#[test]
fn ipv6_services_and_destinations() {
    let key = ServiceKey::tcp(sa("[fd00:26::80]:6666"));
    let v6 = Service::new(key, "mh").with_flags(ServiceFlags::FALLBACK);
    let want = vec![desired(
        v6.clone(),
        vec![
            dest("[fd00:27::10]:6666", 1),
            dest("[fd00:27::2]:6666", 1),
            dest("[fd00:27::2]:80", 2),
        ],
    )];
    let (ops, after) = converge(&want, &[]);
    assert_eq!(
        ops,
        vec![
            Op::NewService(v6.clone()),
            Op::NewDest {
                service: key,
                dest: dest("[fd00:27::2]:80", 2)
            },
            Op::NewDest {
                service: key,
                dest: dest("[fd00:27::2]:6666", 1)
            },
            Op::NewDest {
                service: key,
                dest: dest("[fd00:27::10]:6666", 1)
            },
        ]
    );
    assert_eq!(after[0].service.netmask, Netmask::V6Prefix(128));
    // Remove one, quiesce another.
    let want2 = vec![desired(
        v6,
        vec![dest("[fd00:27::10]:6666", 0), dest("[fd00:27::2]:6666", 1)],
    )];
    let (ops, _) = converge(&want2, &after);
    assert_eq!(
        ops,
        vec![
            Op::SetDest {
                service: key,
                dest: dest("[fd00:27::10]:6666", 0)
            },
            Op::DelDest {
                service: key,
                addr: sa("[fd00:27::2]:80")
            },
        ]
    );
}

#[test]
fn fwmark_services() {
    let k4 = ServiceKey::Fwmark {
        af: AddressFamily::Inet,
        mark: 0x1900,
    };
    let k6 = ServiceKey::Fwmark {
        af: AddressFamily::Inet6,
        mark: 0x1900,
    };
    let want = vec![
        desired(Service::new(k6, "sh"), vec![dest("[fd00::1]:0", 1)]),
        desired(
            Service::new(k4, "sh"),
            vec![dest("192.168.27.1:0", 1), dest("192.168.27.0:0", 1)],
        ),
    ];
    let (ops, after) = converge(&want, &[]);
    assert_eq!(
        ops,
        vec![
            Op::NewService(Service::new(k4, "sh")),
            Op::NewService(Service::new(k6, "sh")),
            Op::NewDest {
                service: k4,
                dest: dest("192.168.27.0:0", 1)
            },
            Op::NewDest {
                service: k4,
                dest: dest("192.168.27.1:0", 1)
            },
            Op::NewDest {
                service: k6,
                dest: dest("[fd00::1]:0", 1)
            },
        ]
    );
    // Dropping the IPv6 one deletes exactly that service.
    let (ops, _) = converge(&want[1..], &after);
    assert_eq!(ops, vec![Op::DelService(k6)]);
}

#[test]
fn everything_removed_when_nothing_desired() {
    let current = vec![
        KernelService {
            service: mh(vip_key(1)),
            destinations: vec![dest("192.168.27.1:1", 1)],
        },
        KernelService {
            service: mh(vip_key(2)),
            destinations: vec![],
        },
    ];
    let (ops, after) = converge(&[], &current);
    // Deleting a service deletes its destinations with it: no DEL_DEST needed.
    assert_eq!(
        ops,
        vec![Op::DelService(vip_key(1)), Op::DelService(vip_key(2))]
    );
    assert!(after.is_empty());
}

#[test]
fn duplicates_in_desired_later_wins() {
    let key = vip_key(6666);
    let want = vec![desired(
        mh(key),
        vec![dest("192.168.27.1:6666", 1), dest("192.168.27.1:6666", 5)],
    )];
    let (ops, _) = converge(&want, &[]);
    assert_eq!(
        ops,
        vec![
            Op::NewService(mh(key)),
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.1:6666", 5)
            }
        ]
    );
}

#[test]
fn plan_is_deterministic_regardless_of_input_order() {
    let mut want: Vec<DesiredService> = (0..20u32)
        .map(|i| {
            desired(
                mh(vip_key(6000 + ((i * 7919) % 100) as u16)),
                (0..8u16)
                    .map(|j| dest(&format!("192.168.27.{}:6666", (j * 37) % 16), 1))
                    .collect(),
            )
        })
        .collect();
    let a = plan(&want, &[], all);
    want.reverse();
    for d in &mut want {
        d.destinations.reverse();
    }
    assert_eq!(a, plan(&want, &[], all));
}

#[test]
fn large_plan_from_empty_and_resync() {
    // The benchmark shape: 1000 services x 16 destinations.
    let want: Vec<DesiredService> = (0..1000u32)
        .map(|i| {
            let vip = std::net::Ipv4Addr::from(0x0aff_0000 + i);
            desired(
                mh(ServiceKey::tcp(SocketAddr::new(vip.into(), 80))),
                (0..16u8)
                    .map(|j| dest(&format!("192.168.27.{j}:80"), 1))
                    .collect(),
            )
        })
        .collect();
    let (ops, _) = converge(&want, &[]);
    assert_eq!(ops.len(), 1000 + 16_000);
}

/// mh/sh: after a destination left and came back, the kernel's list must be the one a router
/// building the service from empty gets (the maglev table follows the list order).
#[test]
fn mh_list_after_churn_matches_a_fresh_build() {
    let key = vip_key(6666);
    let all5: Vec<Destination> = (1..=5)
        .map(|i| dest(&format!("192.168.27.{i}:6666"), 1))
        .collect();
    let want_all = vec![desired(mh(key), all5.clone())];
    let (_, fresh) = converge(&want_all, &[]);
    let fresh_order: Vec<SocketAddr> = fresh[0].destinations.iter().map(|d| d.addr).collect();
    // Dumped head first: added in ascending order reads back descending.
    assert_eq!(fresh_order[0], sa("192.168.27.5:6666"));

    // .3 goes away (on_failure: remove) and comes back.
    let without3: Vec<Destination> = all5
        .iter()
        .filter(|d| d.addr != sa("192.168.27.3:6666"))
        .cloned()
        .collect();
    let (_, after_remove) = converge(&[desired(mh(key), without3)], &fresh);
    let (ops, back) = converge(&want_all, &after_remove);
    let order: Vec<SocketAddr> = back[0].destinations.iter().map(|d| d.addr).collect();
    assert_eq!(order, fresh_order);
    // Only the two that sort after .3 are re-inserted, deleted first then added in order.
    assert_eq!(
        ops,
        vec![
            Op::DelDest {
                service: key,
                addr: sa("192.168.27.5:6666")
            },
            Op::DelDest {
                service: key,
                addr: sa("192.168.27.4:6666")
            },
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.3:6666", 1)
            },
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.4:6666", 1)
            },
            Op::NewDest {
                service: key,
                dest: dest("192.168.27.5:6666", 1)
            },
        ]
    );

    // A new destination that sorts last needs no re-insertion.
    let mut six = all5.clone();
    six.push(dest("192.168.27.6:6666", 1));
    let (ops, _) = converge(&[desired(mh(key), six)], &fresh);
    assert_eq!(
        ops,
        vec![Op::NewDest {
            service: key,
            dest: dest("192.168.27.6:6666", 1)
        }]
    );

    // A list someone built in another order is fixed on the next addition, and converges.
    let scrambled = vec![KernelService {
        service: mh(key),
        destinations: vec![
            dest("192.168.27.2:6666", 1),
            dest("192.168.27.5:6666", 1),
            dest("192.168.27.1:6666", 1),
        ],
    }];
    let want = vec![desired(
        mh(key),
        vec![
            dest("192.168.27.1:6666", 1),
            dest("192.168.27.2:6666", 1),
            dest("192.168.27.4:6666", 1),
            dest("192.168.27.5:6666", 1),
        ],
    )];
    let (_, fixed) = converge(&want, &scrambled);
    let (_, fresh4) = converge(&want, &[]);
    assert_eq!(fixed[0].destinations, fresh4[0].destinations);
    // ... but without an addition it is adopted as it is (no write).
    assert_eq!(
        plan(
            &[desired(
                mh(key),
                vec![
                    dest("192.168.27.1:6666", 1),
                    dest("192.168.27.2:6666", 1),
                    dest("192.168.27.5:6666", 1)
                ]
            )],
            &scrambled,
            all
        ),
        vec![]
    );
}

#[test]
fn order_independent_schedulers_are_never_reinserted() {
    let key = vip_key(6666);
    let rr = Service::new(key, "rr");
    let current = vec![KernelService {
        service: rr.clone(),
        destinations: vec![dest("192.168.27.5:6666", 1), dest("192.168.27.1:6666", 1)],
    }];
    let want = vec![desired(
        rr,
        vec![
            dest("192.168.27.1:6666", 1),
            dest("192.168.27.3:6666", 1),
            dest("192.168.27.5:6666", 1),
        ],
    )];
    let (ops, _) = converge(&want, &current);
    assert_eq!(
        ops,
        vec![Op::NewDest {
            service: key,
            dest: dest("192.168.27.3:6666", 1)
        }]
    );
}
