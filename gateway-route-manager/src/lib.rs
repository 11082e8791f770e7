//! Gateway health, egress and return routing, DDNS for vpn-router.
