//! Where the layer reads a client's address from, for keys with `allowed_ips`.
//!
//! The layer asks its [`ClientIp`] for the address of each request whose key has
//! `allowed_ips`, and only then: a key without them never pays for the look.
//! Behind proxies, the client is the rightmost address of the chain that is not a
//! proxy you trust, walking left from the connection's peer; the addresses further
//! left were written by the client, who may write anything there.
//!
//! # Example
//!
//! ```
//! use std::{convert::Infallible, net::SocketAddr};
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{Layer, Service, ServiceExt};
//! use tower_api_key::{ApiKey, ApiKeyLayer, ClientIp, KeySet};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeySet::from_keys([
//!     ApiKey::new("office", "k-office").with_allowed_ips(["203.0.113.0/24".parse()?]),
//! ])?;
//! // The server sits behind a load balancer in 10.0.0.0/8.
//! let layer = ApiKeyLayer::new(keys).client_ip(ClientIp::x_forwarded_for(["10.0.0.0/8".parse()?]));
//! let mut svc = layer.layer(tower::service_fn(|_: Request<String>| async {
//!     Ok::<_, Infallible>(Response::new(String::new()))
//! }));
//! let via_balancer = |chain: &str| -> Result<Request<String>, http::Error> {
//!     let mut req = Request::get("/")
//!         .header("authorization", "Bearer k-office")
//!         .header("x-forwarded-for", chain)
//!         .body(String::new())?;
//!     // What axum's `ConnectInfo` or tonic's `TcpConnectInfo` would say: the balancer.
//!     req.extensions_mut().insert(SocketAddr::from(([10, 0, 0, 1], 443)));
//!     Ok(req)
//! };
//!
//! // The balancer appended the office's address: let in.
//! let res = svc.ready().await?.call(via_balancer("203.0.113.9")?).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! // A client elsewhere wrote the office's address first: the balancer appended the
//! // real one, which is what counts.
//! let res = svc.ready().await?.call(via_balancer("203.0.113.9, 198.51.100.7")?).await?;
//! assert_eq!(res.status(), StatusCode::FORBIDDEN);
//! # Ok(()) }
//! ```

use std::{fmt, net::IpAddr, net::SocketAddr, sync::Arc};

use http::{HeaderMap, HeaderName, Request, header};

use crate::limit::IpNet;

/// How [`ApiKeyLayer`](crate::ApiKeyLayer) learns a client's address, which a key's
/// `allowed_ips` is checked against ([`ApiKeyLayer::client_ip`](crate::ApiKeyLayer::client_ip)).
///
/// - [`ClientIp::peer`] (the default): the address of the connection's peer, from
///   axum's `ConnectInfo<SocketAddr>` (serve with
///   `into_make_service_with_connect_info::<SocketAddr>()`), tonic's
///   `TcpConnectInfo`, or a `SocketAddr` in the request's extensions;
/// - [`ClientIp::x_forwarded_for`]: behind proxies, the rightmost address of
///   `X-Forwarded-For` that is not one of your trusted proxies — never the
///   leftmost, which any client can write;
/// - [`ClientIp::forwarded`]: the same over RFC 7239 `Forwarded: for=…`;
/// - [`ClientIp::header`]: a CDN's header holding one address (e.g.
///   `CF-Connecting-IP`), for a server that only the CDN can reach.
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are their IPv4 address. An address
/// that cannot be read (garbage, `unknown`, an obfuscated node, a zone id) makes the
/// client unknown, and a key with `allowed_ips` refuses an unknown client.
///
/// # Example
///
/// ```
/// use tower_api_key::{ApiKeyLayer, ClientIp, KeySet};
///
/// let layer = ApiKeyLayer::new(KeySet::new())
///     .client_ip(ClientIp::x_forwarded_for(["10.0.0.0/8".parse()?]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ClientIp(Kind);

#[derive(Clone)]
enum Kind {
    Peer,
    XForwardedFor(Arc<[IpNet]>),
    Forwarded(Arc<[IpNet]>),
    Header(HeaderName),
}

/// The most addresses read from a chain, right to left: a longer one is cut there
/// and its client is unknown.
const MAX_HOPS: usize = 64;

impl ClientIp {
    /// The connection's peer address (the default): axum's
    /// `ConnectInfo<SocketAddr>`, tonic's `TcpConnectInfo`, or a `SocketAddr` in the
    /// request's extensions. A tonic server with TLS puts a `TlsConnectInfo` there
    /// instead, which this crate does not name (it builds tonic without TLS): put the
    /// peer's `SocketAddr` in the extensions in a layer before this one, or every
    /// key with `allowed_ips` is refused (the client is unknown).
    #[must_use]
    pub fn peer() -> Self {
        Self(Kind::Peer)
    }

    /// The rightmost address of the `X-Forwarded-For` chain (the peer last) that is
    /// not in `trusted_proxies`. A peer that is not a trusted proxy is the client
    /// itself, whatever the header says; a chain of trusted addresses only gives its
    /// leftmost.
    #[must_use]
    pub fn x_forwarded_for(trusted_proxies: impl IntoIterator<Item = IpNet>) -> Self {
        Self(Kind::XForwardedFor(trusted_proxies.into_iter().collect()))
    }

    /// Like [`ClientIp::x_forwarded_for`], over the `for=` parameters of RFC 7239
    /// `Forwarded` fields. A field whose quoted strings are not closed, or stand
    /// where the RFC allows none, is unreadable as a whole (the client is unknown):
    /// a client could otherwise open a quote that swallows what its proxy appends.
    #[must_use]
    pub fn forwarded(trusted_proxies: impl IntoIterator<Item = IpNet>) -> Self {
        Self(Kind::Forwarded(trusted_proxies.into_iter().collect()))
    }

    /// The one address in header `name`, set by a CDN in front of the server. Only
    /// for a server the CDN alone can reach: any client that reaches it directly
    /// chooses its address.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name: it is a constant of the program.
    #[must_use]
    pub fn header(name: impl AsRef<str>) -> Self {
        let name = HeaderName::try_from(name.as_ref()).expect("a valid header name");
        Self(Kind::Header(name))
    }

    /// The client's address for `req`, if it can be told.
    pub(crate) fn resolve<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let addr = match &self.0 {
            Kind::Peer => peer(req),
            Kind::XForwardedFor(trusted) => {
                let values = req.headers().get_all("x-forwarded-for");
                let hops = values
                    .iter()
                    .map(|v| v.to_str().ok())
                    .collect::<Option<Vec<&str>>>()?;
                let hops = hops.iter().rev().flat_map(|v| v.rsplit(',')).map(xff_hop);
                rightmost_untrusted(peer(req)?, hops, trusted)
            }
            Kind::Forwarded(trusted) => {
                let hops = forwarded_hops(req.headers())?;
                rightmost_untrusted(peer(req)?, hops.into_iter().rev(), trusted)
            }
            Kind::Header(name) => {
                let mut values = req.headers().get_all(name).iter();
                let (Some(value), None) = (values.next(), values.next()) else {
                    return None;
                };
                value.to_str().ok()?.trim().parse().ok()
            }
        };
        addr.map(|a: IpAddr| a.to_canonical())
    }
}

/// The peer address the server put in the request's extensions.
fn peer<B>(req: &Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    #[cfg(feature = "axum")]
    if let Some(info) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0.ip());
    }
    #[cfg(feature = "tonic")]
    if let Some(info) = ext.get::<tonic::transport::server::TcpConnectInfo>() {
        return info.remote_addr().map(|a| a.ip());
    }
    ext.get::<SocketAddr>().map(SocketAddr::ip)
}

/// Walks hops right to left from the peer: the first not trusted is the client; an
/// unreadable one, or more than [`MAX_HOPS`], makes it unknown.
fn rightmost_untrusted(
    peer: IpAddr,
    hops: impl Iterator<Item = Option<IpAddr>>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let mut client = peer;
    let mut hops = hops;
    for _ in 0..MAX_HOPS {
        if !IpNet::any_contains(trusted, client) {
            return Some(client);
        }
        match hops.next() {
            None => return Some(client),
            Some(hop) => client = hop?,
        }
    }
    None
}

/// One `X-Forwarded-For` entry: an address, `[v6]`, `[v6]:port` or `v4:port`.
fn xff_hop(hop: &str) -> Option<IpAddr> {
    node(hop.trim())
}

/// A node as RFC 7239 writes it (unquoted): an IPv4 address, a bracketed IPv6
/// address, either with a port. `unknown` and obfuscated names are no address.
fn node(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port)) {
            return None;
        }
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(addr) = node.parse::<IpAddr>() {
        return Some(addr);
    }
    let (v4, after) = node.split_once(':')?;
    port(after).then_some(())?;
    v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A port number: 1 to 5 digits, at most 65535.
fn port(s: &str) -> bool {
    (1..=5).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok()
}

/// The `for=` node of each element of every `Forwarded` field, in order; `None` for
/// an element without one, or one that cannot be read. `None` overall for a field
/// that is not text.
fn forwarded_hops(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for value in headers.get_all(header::FORWARDED) {
        let text = value.to_str().ok()?;
        for element in split_unquoted(text, ',')? {
            let mut found = None;
            for pair in split_unquoted(element, ';')? {
                let Some((name, value)) = pair.split_once('=') else {
                    continue;
                };
                if name.trim().eq_ignore_ascii_case("for") {
                    found = unquote(value.trim()).and_then(|v| node(&v));
                    break;
                }
            }
            hops.push(found);
            if hops.len() > MAX_HOPS * 4 {
                return None;
            }
        }
    }
    Some(hops)
}

/// `text` split at `sep` outside quoted strings (with `\` escapes); `None` when
/// its quotes are not where RFC 7239 allows them: a quoted string opens right after
/// `=`, closes before a `,`, a `;` or the end, and closes. A stray or unclosed quote
/// would let a client's field swallow the elements a proxy appends after it (one
/// field value, or lines merged as HTTP allows), so that its own `for=` is the last.
fn split_unquoted(text: &str, sep: char) -> Option<Vec<&str>> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' if quoted => {
                let after = text[i + 1..].trim_start_matches([' ', '\t']);
                if !(after.is_empty() || after.starts_with([',', ';'])) {
                    return None;
                }
                quoted = false;
            }
            '"' if text[..i].ends_with('=') => quoted = true,
            '"' => return None,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

/// A token, or a quoted string without its quotes and escapes.
fn unquote(value: &str) -> Option<String> {
    match value.strip_prefix('"') {
        None => Some(value.to_owned()),
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' { chars.next()? } else { c });
            }
            Some(out)
        }
    }
}

impl Default for ClientIp {
    fn default() -> Self {
        Self::peer()
    }
}

impl fmt::Debug for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Peer => f.write_str("ClientIp::peer"),
            Kind::XForwardedFor(t) => f.debug_tuple("ClientIp::x_forwarded_for").field(t).finish(),
            Kind::Forwarded(t) => f.debug_tuple("ClientIp::forwarded").field(t).finish(),
            Kind::Header(name) => f.debug_tuple("ClientIp::header").field(name).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::try_from(*name).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        req
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn trusted() -> Vec<IpNet> {
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8:ffff::/48".parse().unwrap(),
        ]
    }

    #[test]
    fn the_peer_by_default_mapped_addresses_as_ipv4() {
        let xff = [("x-forwarded-for", "1.2.3.4")];
        assert_eq!(
            ClientIp::peer().resolve(&req("203.0.113.9:5000", &xff)),
            ip("203.0.113.9")
        );
        assert_eq!(
            ClientIp::peer().resolve(&req("[::ffff:203.0.113.9]:5000", &[])),
            ip("203.0.113.9")
        );
        assert_eq!(ClientIp::peer().resolve(&Request::new(())), None);
    }

    #[test]
    fn x_forwarded_for_takes_the_rightmost_untrusted_address() {
        let c = ClientIp::x_forwarded_for(trusted());
        // Forged entries on the left count for nothing.
        let forged = [("x-forwarded-for", "203.0.113.1, 198.51.100.7, 10.1.1.1")];
        assert_eq!(c.resolve(&req("10.0.0.1:1", &forged)), ip("198.51.100.7"));
        // Several fields are one list, in order.
        let split = [
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "198.51.100.7, 10.2.2.2"),
        ];
        assert_eq!(c.resolve(&req("10.0.0.1:1", &split)), ip("198.51.100.7"));
        // A peer that is no trusted proxy is the client, whatever it claims.
        assert_eq!(c.resolve(&req("192.0.2.1:1", &forged)), ip("192.0.2.1"));
        // Garbage where the walk reaches it: unknown.
        for bad in [
            "203.0.113.1, garbage",
            "fe80::1%eth0",
            "unknown",
            "",
            "1.2.3.4:99999",
            "[2001:db8::1",
        ] {
            assert_eq!(
                c.resolve(&req("10.0.0.1:1", &[("x-forwarded-for", bad)])),
                None,
                "{bad:?}"
            );
        }
        // Ports and brackets are read; mapped addresses are IPv4.
        let ported = [("x-forwarded-for", "[2001:db8::5]:443, ::ffff:10.9.9.9")];
        assert_eq!(c.resolve(&req("10.0.0.1:1", &ported)), ip("2001:db8::5"));
        let v4port = [("x-forwarded-for", "198.51.100.7:8080")];
        assert_eq!(c.resolve(&req("10.0.0.1:1", &v4port)), ip("198.51.100.7"));
        // All trusted: the leftmost; no header: the peer.
        let inside = [("x-forwarded-for", "10.3.3.3, 10.4.4.4")];
        assert_eq!(c.resolve(&req("10.0.0.1:1", &inside)), ip("10.3.3.3"));
        assert_eq!(c.resolve(&req("10.0.0.1:1", &[])), ip("10.0.0.1"));
        // A very long chain of trusted hops is cut: unknown.
        let long = vec!["10.0.0.7"; 100].join(",");
        assert_eq!(
            c.resolve(&req("10.0.0.1:1", &[("x-forwarded-for", &long)])),
            None
        );
        // No peer: unknown.
        assert_eq!(c.resolve(&Request::new(())), None);
    }

    #[test]
    fn forwarded_reads_for_parameters_and_refuses_garbage() {
        let c = ClientIp::forwarded(trusted());
        let chain = [(
            "forwarded",
            r#"for=203.0.113.1;proto=https, for="[2001:db8::7]:4711";by=10.0.0.2, FOR=10.5.5.5"#,
        )];
        assert_eq!(c.resolve(&req("10.0.0.1:1", &chain)), ip("2001:db8::7"));
        let quoted = [("forwarded", r#"for="198.51.100.7:80";host="a,b;c""#)];
        assert_eq!(c.resolve(&req("10.0.0.1:1", &quoted)), ip("198.51.100.7"));
        for bad in [
            "for=unknown",
            "for=_hidden",
            "proto=https",
            "for=\"[fe80::1%25eth0]\"",
            "for=\"unterminated",
            "for=[2001:db8::1]x",
            // A client's open quote swallows what its proxy appends after it.
            "for=203.0.113.5;x=\", for=198.51.100.9",
            "for=203.0.113.5;x=\"\\\", for=198.51.100.9",
            "for=203.0.113.5;x=a\"b\", for=198.51.100.9",
            "for=203.0.113.5;x=\"a\"b, for=198.51.100.9",
            ";;;,,,==",
        ] {
            assert_eq!(
                c.resolve(&req("10.0.0.1:1", &[("forwarded", bad)])),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(c.resolve(&req("192.0.2.1:1", &chain)), ip("192.0.2.1"));
    }

    proptest::proptest! {
        /// Whatever bytes the fields hold, resolving never panics, and the address it
        /// gives is the peer's or one written in them: never one it made up.
        #[test]
        fn any_header_bytes_give_the_peer_a_written_address_or_none(
            values in proptest::collection::vec(
                proptest::collection::vec(proptest::prop_oneof![
                    proptest::sample::select(b" ,;=\"[]:%_.unknownfor0123456789abcdef10ffff".to_vec()),
                    proptest::num::u8::ANY,
                ], 0..60),
                0..4,
            ),
            peer in proptest::sample::select(vec!["10.0.0.1:1", "198.51.100.2:1", "[::ffff:10.0.0.9]:1"]),
        ) {
            for (kind, name) in [
                (ClientIp::x_forwarded_for(trusted()), "x-forwarded-for"),
                (ClientIp::forwarded(trusted()), "forwarded"),
                (ClientIp::header("cf-connecting-ip"), "cf-connecting-ip"),
            ] {
                let mut req = req(peer, &[]);
                for value in &values {
                    if let Ok(value) = http::HeaderValue::from_bytes(value) {
                        req.headers_mut().append(HeaderName::from_static(name), value);
                    }
                }
                let Some(found) = kind.resolve(&req) else { continue };
                let peer_ip = peer.parse::<SocketAddr>().unwrap().ip().to_canonical();
                let written = values.iter().any(|v| {
                    String::from_utf8_lossy(v).contains(&found.to_string())
                        || String::from_utf8_lossy(v).contains(&format!("ffff:{found}"))
                });
                proptest::prop_assert!(found == peer_ip || written, "{found} from {values:?}");
            }
        }
    }

    #[test]
    fn a_cdn_header_holds_one_address() {
        let c = ClientIp::header("cf-connecting-ip");
        assert_eq!(
            c.resolve(&req("10.0.0.1:1", &[("cf-connecting-ip", " 203.0.113.4 ")])),
            ip("203.0.113.4")
        );
        for bad in [
            &[("cf-connecting-ip", "203.0.113.4, 1.1.1.1")][..],
            &[],
            &[
                ("cf-connecting-ip", "1.1.1.1"),
                ("cf-connecting-ip", "2.2.2.2"),
            ],
        ] {
            assert_eq!(c.resolve(&req("10.0.0.1:1", bad)), None, "{bad:?}");
        }
    }
}
