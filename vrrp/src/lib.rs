//! VRRP v2/v3 for vpn-router.
