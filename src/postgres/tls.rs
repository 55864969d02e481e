//! TLS for `sslmode`, with rustls (ring): a small connector for tokio-postgres that
//! always verifies the server's certificate, against the Web PKI roots or the CA
//! file an `sslrootcert` names.

use std::{
    future::Future,
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{self, ChannelBinding, MakeTlsConnect, TlsConnect};

/// How connections are secured.
#[derive(Clone)]
pub(crate) enum Mode {
    /// `sslmode=disable`: plain TCP.
    Plain,
    /// TLS, as tokio-postgres's own `sslmode` (prefer or require) asks for it.
    Tls(Arc<rustls::ClientConfig>),
}

impl Mode {
    /// The URL without the options tokio-postgres does not know (`sslrootcert`,
    /// `sslmode=verify-ca|verify-full`, taken as `require`), and how to secure it.
    /// Errors never quote the URL.
    pub(crate) fn split(url: &str) -> Result<(String, Self), &'static str> {
        let mut root: Option<String> = None;
        let mut disable = false;
        let url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (base, query) = url.split_once('?').unwrap_or((url, ""));
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| "a URL option is not UTF-8")?;
                match (key, &*value) {
                    ("sslrootcert", v) => root = Some(v.to_owned()),
                    ("sslmode", "verify-ca" | "verify-full") => kept.push("sslmode=require".into()),
                    ("sslmode", "disable") => {
                        disable = true;
                        kept.push(pair.to_owned());
                    }
                    _ => kept.push(pair.to_owned()),
                }
            }
            if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        } else {
            // The key-value form: `key=value` words.
            let mut kept = Vec::new();
            for word in url.split_whitespace() {
                match word.split_once('=') {
                    Some(("sslrootcert", v)) => root = Some(v.to_owned()),
                    Some(("sslmode", "verify-ca" | "verify-full")) => {
                        kept.push("sslmode=require".to_owned());
                    }
                    Some(("sslmode", "disable")) => {
                        disable = true;
                        kept.push(word.to_owned());
                    }
                    _ => kept.push(word.to_owned()),
                }
            }
            kept.join(" ")
        };
        if disable {
            return Ok((url, Self::Plain));
        }
        let mut roots = rustls::RootCertStore::empty();
        match root {
            Some(path) => {
                // Read as key files are: a regular file of at most 1 MiB, so that a
                // FIFO or `/dev/zero` named by mistake is refused, never waited on.
                let pem = crate::source::read::FileBytes::read(Path::new(&path), 1 << 20).map_err(
                    |_| "the `sslrootcert` file cannot be read (a regular file of at most 1 MiB)",
                )?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|_| "the `sslrootcert` file is not PEM")?;
                    roots
                        .add(cert)
                        .map_err(|_| "the `sslrootcert` file holds a certificate rustls refuses")?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|_| "rustls has no protocol version to offer")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok((url, Self::Tls(Arc::new(config))))
    }

    pub(crate) fn connector(&self) -> Connector {
        Connector(match self {
            Self::Plain => None,
            Self::Tls(config) => Some(config.clone()),
        })
    }
}

/// Makes a TLS connection per host, or none for `sslmode=disable`.
pub(crate) struct Connector(Option<Arc<rustls::ClientConfig>>);

/// One host's TLS handshake.
pub(crate) struct Handshake {
    config: Option<Arc<rustls::ClientConfig>>,
    domain: Option<ServerName<'static>>,
}

/// A connection, with TLS or (for `sslmode=disable`) without.
pub(crate) enum MaybeTlsStream {
    Tls(Box<tokio_rustls::client::TlsStream<tokio_postgres::Socket>>),
    Plain(tokio_postgres::Socket),
}

impl MakeTlsConnect<tokio_postgres::Socket> for Connector {
    type Stream = MaybeTlsStream;
    type TlsConnect = Handshake;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<Handshake> {
        let domain = match &self.0 {
            Some(_) => Some(
                ServerName::try_from(domain.to_owned())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad host name"))?,
            ),
            None => None,
        };
        Ok(Handshake {
            config: self.0.clone(),
            domain,
        })
    }
}

impl TlsConnect<tokio_postgres::Socket> for Handshake {
    type Stream = MaybeTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<MaybeTlsStream>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            match (self.config, self.domain) {
                (Some(config), Some(domain)) => {
                    let tls = tokio_rustls::TlsConnector::from(config)
                        .connect(domain, stream)
                        .await?;
                    Ok(MaybeTlsStream::Tls(Box::new(tls)))
                }
                _ => Ok(MaybeTlsStream::Plain(stream)),
            }
        })
    }
}

impl tls::TlsStream for MaybeTlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for MaybeTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_and_the_root_file_are_taken_out_of_the_url() {
        let (url, mode) =
            Mode::split("postgres://u:pw@db:5432/app?sslmode=verify-full&connect_timeout=3")
                .unwrap();
        assert_eq!(
            url,
            "postgres://u:pw@db:5432/app?sslmode=require&connect_timeout=3"
        );
        assert!(matches!(mode, Mode::Tls(_)));
        let (url, mode) = Mode::split("postgres://u:pw@db/app?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u:pw@db/app?sslmode=disable");
        assert!(matches!(mode, Mode::Plain));
        let (url, _) = Mode::split("host=db user=u sslmode=verify-ca").unwrap();
        assert_eq!(url, "host=db user=u sslmode=require");
        let err = Mode::split("postgres://u:secret-pw@db/app?sslrootcert=/nonexistent/ca.pem")
            .err()
            .unwrap();
        assert!(!err.contains("secret-pw"));
    }
}
