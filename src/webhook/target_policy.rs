//! Which addresses a subscriber URL may reach. Checked on the addresses actually connected
//! to: the resolver below drops forbidden ones after DNS, so a public name pointing at a
//! private address is refused too and DNS rebinding has no gap between check and connect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::config::CidrList;

/// Said wherever a target is refused, so an operator knows the way out.
pub const ALLOW_HINT: &str = "allow with OUTBOX_ALLOW_PRIVATE_TARGETS";

const FORBIDDEN_V4: &[Ipv4Net] = &[
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8), // "this network", includes unspecified
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8), // private
    Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10), // CGNAT shared space
    Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8), // loopback
    Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata
    Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12), // private
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 0, 0), 24), // IETF protocol assignments
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 2, 0), 24), // documentation TEST-NET-1
    Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16), // private
    Ipv4Net::new_assert(Ipv4Addr::new(198, 18, 0, 0), 15), // benchmarking
    Ipv4Net::new_assert(Ipv4Addr::new(198, 51, 100, 0), 24), // documentation TEST-NET-2
    Ipv4Net::new_assert(Ipv4Addr::new(203, 0, 113, 0), 24), // documentation TEST-NET-3
    Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
    Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4), // reserved, includes broadcast
];

const FORBIDDEN_V6: &[Ipv6Net] = &[
    // Unspecified, loopback and the deprecated IPv4-compatible ::a.b.c.d forms.
    Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 96),
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64
    Ipv6Net::new_assert(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),     // discard-only
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48),    // benchmarking
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    Ipv6Net::new_assert(Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),    // documentation
    Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),     // unique local
    Ipv6Net::new_assert(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),    // link-local
    Ipv6Net::new_assert(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),    // old site-local
    Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),     // multicast
];

/// Well-known NAT64 prefix: the last 32 bits are an IPv4 address the translator will reach.
const NAT64_WKP: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

/// Which addresses subscriber URLs may reach.
///
/// Refused unless a CIDR in `allowed_private` covers the address: IPv4 private, loopback,
/// link-local, CGNAT (100.64/10), 0/8 (with unspecified), IETF 192.0.0/24, documentation,
/// benchmarking (198.18/15), multicast, reserved 240/4 (with broadcast); IPv6 loopback,
/// unspecified and IPv4-compatible (::/96), ULA fc00::/7, link-local fe80::/10, site-local
/// fec0::/10, multicast, documentation (2001:db8::/32, 3fff::/20), benchmarking 2001:2::/48,
/// discard 100::/64, local-use NAT64 64:ff9b:1::/48, and the IPv4-mapped (::ffff:0:0/96) and
/// NAT64 (64:ff9b::/96) forms of refused IPv4 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    pub allowed_private: Vec<IpNet>,
}

impl From<&CidrList> for TargetPolicy {
    fn from(allowed: &CidrList) -> TargetPolicy {
        TargetPolicy {
            allowed_private: allowed.0.clone(),
        }
    }
}

impl TargetPolicy {
    /// True when a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        // Mapped and NAT64 forms reach the embedded IPv4 host, so that host is what gets judged,
        // and an allow-list entry written in IPv4 (127.0.0.0/8) covers them too.
        let embedded = embedded_v4(ip);
        let forbidden = match (embedded, ip) {
            (Some(v4), _) | (None, IpAddr::V4(v4)) => is_forbidden_v4(v4),
            (None, IpAddr::V6(v6)) => FORBIDDEN_V6.iter().any(|net| net.contains(&v6)),
        };
        if !forbidden {
            return true;
        }
        self.allowed_private.iter().any(|net| {
            net.contains(&ip) || embedded.is_some_and(|v4| net.contains(&IpAddr::V4(v4)))
        })
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    FORBIDDEN_V4.iter().any(|net| net.contains(&ip))
}

fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().or_else(|| {
            NAT64_WKP.contains(&v6).then(|| {
                let [.., a, b, c, d] = v6.octets();
                Ipv4Addr::new(a, b, c, d)
            })
        }),
    }
}

/// The resolver refused every address a name resolved to; found again in reqwest's error chain
/// to report [`FailureKind::ForbiddenTarget`] instead of a generic connect error.
#[derive(Debug, thiserror::Error)]
#[error("refused: {host} resolves only to forbidden addresses ({addrs}); {ALLOW_HINT}")]
pub struct ForbiddenResolution {
    host: String,
    addrs: String,
}

/// Resolves with the system resolver and drops forbidden addresses, so the check happens on the
/// addresses actually connected to (no gap for DNS rebinding between check and connect).
pub struct GuardedResolver {
    policy: Arc<TargetPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<TargetPolicy>) -> Self {
        Self { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (permitted, refused): (Vec<_>, Vec<_>) = resolved
                .into_iter()
                .partition(|addr| policy.permits(addr.ip()));
            if permitted.is_empty() {
                let addrs = refused
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Box::new(ForbiddenResolution { host, addrs }) as _);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP literal")
    }

    #[test]
    fn refuses_every_listed_v4_range() {
        let policy = TargetPolicy::default();
        for addr in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!policy.permits(ip(addr)), "{addr} must be refused");
        }
    }

    #[test]
    fn refuses_every_listed_v6_range_and_embedded_v4_forms() {
        let policy = TargetPolicy::default();
        for addr in [
            "::",
            "::1",
            "::127.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "2001:db8::1",
            "3fff::1",
            "2001:2::1",
            "100::1",
            "64:ff9b:1::a",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!policy.permits(ip(addr)), "{addr} must be refused");
        }
    }

    #[test]
    fn permits_public_addresses_and_their_embedded_forms() {
        let policy = TargetPolicy::default();
        for addr in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:2800:220:1:248:1893:25c8:1946",
            "::ffff:93.184.216.34",
            "64:ff9b::5db8:d822",
        ] {
            assert!(policy.permits(ip(addr)), "{addr} must be permitted");
        }
    }

    #[test]
    fn allow_list_opens_only_what_it_covers() {
        let policy = TargetPolicy {
            allowed_private: CidrList::parse("127.0.0.0/8, 10.1.2.3, fd00::/8")
                .expect("valid list")
                .0,
        };
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("::ffff:127.0.0.1")));
        assert!(policy.permits(ip("10.1.2.3")));
        assert!(!policy.permits(ip("10.1.2.4")));
        assert!(policy.permits(ip("fd00::5")));
        assert!(!policy.permits(ip("fc00::5")));
        assert!(!policy.permits(ip("::1")));
        assert!(!policy.permits(ip("169.254.169.254")));
    }
}
