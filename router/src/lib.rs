//! vpn-router library: config, supervisor, api.
