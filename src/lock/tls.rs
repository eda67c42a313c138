//! tokio-postgres's TLS hooks, implemented with tokio-rustls: the connector, the stream, and the
//! certificate checks each `sslmode` asks for.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::url::{Roots, SslMode, Tls};

/// Makes a TLS connector per connection.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustls {
    /// The connector for the URL's TLS settings; reads `sslrootcert`, `sslcert` and `sslkey`. The error
    /// names the parameter and the file.
    pub fn new(tls: &Tls) -> Result<MakeRustls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trust = match tls.mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => None,
            SslMode::VerifyCa | SslMode::VerifyFull => Some(trust_of(&tls.roots)?),
        };
        let verifier = Verifier {
            provider: Arc::clone(&provider),
            trust,
            check_name: tls.mode == SslMode::VerifyFull,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match &tls.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| format!("sslcert={}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("sslkey={}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("sslcert and sslkey: {e}"))?
            }
        };
        Ok(MakeRustls {
            config: Arc::new(config),
        })
    }

    /// The rustls configuration itself, for the MySQL client, which upgrades its socket by hand.
    #[cfg(feature = "mysql")]
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }
}

/// The roots to check against, and the certificates of an `sslrootcert` file as they are: a
/// self-signed server certificate (what `openssl req -x509` makes) is a CA certificate, which webpki
/// refuses as the end entity, while libpq accepts it as its own root.
fn trust_of(roots: &Roots) -> Result<Trust, String> {
    match roots {
        Roots::System => Ok(Trust {
            roots: rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
            exact: Vec::new(),
        }),
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| {
                    format!(
                        "sslrootcert={}: cannot read the certificates ({e}); point it at a PEM file",
                        path.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "sslrootcert={}: the file holds no PEM certificate",
                    path.display()
                ));
            }
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(certs.iter().cloned());
            Ok(Trust {
                roots: store,
                exact: certs,
            })
        }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connector;
    type Error = rustls::pki_types::InvalidDnsNameError;

    /// `domain` is empty for a Unix socket, which never gets TLS (`url.rs` turns TLS off for
    /// sockets): its connector has no name and refuses to be used.
    fn make_tls_connect(&mut self, domain: &str) -> Result<Connector, Self::Error> {
        Ok(Connector {
            config: Arc::clone(&self.config),
            name: if domain.is_empty() {
                None
            } else {
                Some(ServerName::try_from(domain.to_owned())?)
            },
        })
    }
}

/// Connects one stream.
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    /// `None` for a Unix socket.
    name: Option<ServerName<'static>>,
}

impl<S> TlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "no TLS over a Unix socket (it has no host name to check)",
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(Stream(tls))
        })
    }
}

/// A TLS stream as tokio-postgres wants it.
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    /// `tls-server-end-point` (RFC 5929): a hash of the server's certificate, so that SCRAM-SHA-256-PLUS
    /// can bind the login to this TLS session (`channel_binding=require`).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, connection) = self.0.get_ref();
        match connection
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| end_point_hash(cert))
        {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// Who may be at the other end: anyone (`prefer`, `require`: encrypt, and check the handshake's
/// signatures, as libpq does), or a certificate that chains to `trust` (`verify-ca`), also issued for
/// the host (`verify-full`).
#[derive(Debug)]
struct Verifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    trust: Option<Trust>,
    check_name: bool,
}

#[derive(Debug)]
struct Trust {
    roots: rustls::RootCertStore,
    /// Accepted as they are when the server presents one of them.
    exact: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(trust) = &self.trust else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        if !trust
            .exact
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &trust.roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The hash of a DER certificate for `tls-server-end-point`: the certificate's own signature hash,
/// except that MD5 and SHA-1 become SHA-256 (RFC 5929 section 4.1). `None` for algorithms whose hash
/// is not defined here (Ed25519, RSA-PSS): the login then goes without channel binding, and
/// `channel_binding=require` refuses it.
fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use ring::digest;
    // 1.2.840.113549.1.1.x (RSA) and 1.2.840.10045.4.x (ECDSA).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, ... }, signature }
    let (body, _) = der(cert, 0x30)?;
    let (_, rest) = der(body, 0x30)?;
    let (algorithm, _) = der(rest, 0x30)?;
    let (oid, _) = der(algorithm, 0x06)?;
    let hash = match oid.split_last() {
        Some((4 | 5 | 11, prefix)) if prefix == RSA => &digest::SHA256,
        Some((12, prefix)) if prefix == RSA => &digest::SHA384,
        Some((13, prefix)) if prefix == RSA => &digest::SHA512,
        Some((1, prefix)) if prefix == ECDSA => &digest::SHA256,
        _ => match oid.strip_prefix(ECDSA) {
            Some([3, 2]) => &digest::SHA256,
            Some([3, 3]) => &digest::SHA384,
            Some([3, 4]) => &digest::SHA512,
            _ => return None,
        },
    };
    Some(digest::digest(hash, cert).as_ref().to_vec())
}

/// One DER element with tag `tag` at the start of `input`: its contents and what follows it.
fn der(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let count = usize::from(len & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (digits, after) = rest.split_at(count);
        rest = after;
        digits
            .iter()
            .fold(0usize, |n, &d| (n << 8) | usize::from(d))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        // A minimal certificate shape: SEQUENCE { SEQUENCE {}, SEQUENCE { OID sha384WithRSA }, BIT STRING }.
        let cert = [
            0x30, 0x11, 0x30, 0x00, 0x30, 0x0b, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d,
            0x01, 0x01, 0x0c, 0x03, 0x02, 0x00, 0x00,
        ];
        let hash = end_point_hash(&cert).unwrap();
        assert_eq!(
            hash,
            ring::digest::digest(&ring::digest::SHA384, &cert).as_ref()
        );
        let mut sha1 = cert;
        sha1[16] = 0x05;
        assert_eq!(
            end_point_hash(&sha1).unwrap().len(),
            32,
            "SHA-1 becomes SHA-256"
        );
        let mut unknown = cert;
        unknown[16] = 0x0a;
        assert!(end_point_hash(&unknown).is_none());
        assert!(end_point_hash(&cert[..10]).is_none());
    }
}
