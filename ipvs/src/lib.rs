//! IPVS generic-netlink client and reconciler for vpn-router.
