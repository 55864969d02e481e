//! Address rules: a network in CIDR notation, matched against a client's address.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// A network an [`ApiKey`](crate::ApiKey)'s `allowed_ips` lets in: `203.0.113.0/24`,
/// `2001:db8::/32`, or a single address (`198.51.100.7`, a `/32` or `/128`).
///
/// An IPv4-mapped IPv6 address (`::ffff:203.0.113.9`) is the IPv4 address it maps:
/// it matches IPv4 rules, and a rule written as a mapped network
/// (`::ffff:203.0.113.0/120`) is the IPv4 rule. A rule with host bits set
/// (`203.0.113.5/24`) is refused, as a typo that would let in more than meant; so is
/// a zone id (`fe80::1%eth0`), which names an interface of one machine, not a network.
///
/// # Example
///
/// ```
/// use tower_api_key::limit::IpNet;
///
/// let net: IpNet = "203.0.113.0/24".parse()?;
/// assert!(net.contains("203.0.113.77".parse()?));
/// assert!(net.contains("::ffff:203.0.113.77".parse()?));
/// assert!(!net.contains("198.51.100.1".parse()?));
/// assert!("203.0.113.5/24".parse::<IpNet>().is_err());
/// assert!("fe80::1%eth0".parse::<IpNet>().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not an [`IpNet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpNetError(&'static str);

impl fmt::Display for IpNetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for IpNetError {}

impl IpNet {
    /// The network of `addr` with `prefix` bits, if the prefix fits the family and
    /// the address has no host bits set. A mapped IPv6 network becomes IPv4.
    ///
    /// # Errors
    ///
    /// A prefix longer than the address, or host bits set.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, IpNetError> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                prefix - 96,
            ),
            other => (other, prefix),
        };
        let bits = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(IpNetError("the prefix is longer than the address"));
        }
        let net = Self { addr, prefix };
        if net.masked(addr) != addr {
            return Err(IpNetError(
                "the address has bits set beyond the prefix (write the network's first address)",
            ));
        }
        Ok(net)
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length, in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// `addr` with the bits beyond this network's prefix cleared, in its family.
    fn masked(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// Whether `addr` is in this network. An IPv4-mapped IPv6 address is taken as
    /// the IPv4 address it maps; the other family never matches.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        match (self.addr, addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                self.masked(addr) == self.addr
            }
            _ => false,
        }
    }

    /// Whether any of `nets` contains `addr`.
    pub(crate) fn any_contains(nets: &[Self], addr: IpAddr) -> bool {
        nets.iter().any(|net| net.contains(addr))
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('%') {
            return Err(IpNetError(
                "a zone id (`%…`) names one machine's interface, not a network",
            ));
        }
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| IpNetError("not an IPv4 or IPv6 address or network"))?;
        let prefix = match prefix {
            None => match addr {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            },
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse()
                .map_err(|_| IpNetError("the prefix is not a number"))?,
            Some(_) => return Err(IpNetError("the prefix is not a number")),
        };
        Self::new(addr, prefix)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_match_their_addresses_only() {
        let v4 = net("203.0.113.0/24");
        assert!(v4.contains(ip("203.0.113.0")) && v4.contains(ip("203.0.113.255")));
        assert!(!v4.contains(ip("203.0.114.0")) && !v4.contains(ip("203.0.112.255")));
        let v6 = net("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("203.0.113.1")) && !v4.contains(ip("2001:db8::1")));
        let all4 = net("0.0.0.0/0");
        assert!(all4.contains(ip("1.2.3.4")) && !all4.contains(ip("::1")));
        assert!(net("::/0").contains(ip("::1")));
        let one = net("198.51.100.7");
        assert_eq!(one.prefix_len(), 32);
        assert!(one.contains(ip("198.51.100.7")) && !one.contains(ip("198.51.100.8")));
        assert_eq!(net("2001:db8::1").prefix_len(), 128);
    }

    #[test]
    fn mapped_addresses_are_their_ipv4_address() {
        let v4 = net("203.0.113.0/24");
        assert!(v4.contains(ip("::ffff:203.0.113.9")));
        assert!(!v4.contains(ip("::ffff:198.51.100.9")));
        let mapped_rule = net("::ffff:203.0.113.0/120");
        assert_eq!(mapped_rule, v4);
        assert!(mapped_rule.contains(ip("203.0.113.1")));
        // Not the IPv4-compatible form, which is deprecated and means something else.
        assert!(!v4.contains(ip("::203.0.113.9")));
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for bad in [
            "",
            "203.0.113.0/33",
            "2001:db8::/129",
            "203.0.113.5/24",
            "203.0.113.0/",
            "203.0.113.0/-1",
            "203.0.113.0/ 24",
            "203.0.113.0/0024",
            "fe80::1%eth0",
            "fe80::%1/64",
            "example.com",
            "1.2.3",
            "[2001:db8::]/32",
        ] {
            let err = bad.parse::<IpNet>().unwrap_err();
            assert!(!err.to_string().is_empty(), "{bad:?}");
        }
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }
}
