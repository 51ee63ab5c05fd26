//! TLS of the worker gateway. The operator serves the gateway with a certificate and
//! hands worker pods the CA that signed it (`LLMOPS_GATEWAY_CA`, a public certificate,
//! in their env); workers then speak TLS and verify the gateway's name, so neither the
//! bearer tokens nor the Assignments cross the network in the clear, and nothing can
//! pose as the gateway.
//!
//! The certificate is either a `kubernetes.io/tls` Secret of the operator's namespace
//! (`tls.crt`, `tls.key`, and `ca.crt` when a CA signed it: cert-manager's layout) or
//! one the operator generates once (a CA and a server certificate for the host of
//! `--gateway-address`) and keeps in the Secret [`GENERATED_SECRET`] there, so every
//! replica and restart serves the same one.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

use crate::config::GatewayTls;
use crate::workload::{FIELD_MANAGER, MANAGED_BY};

/// Secret of the operator's namespace holding the generated certificate.
pub const GENERATED_SECRET: &str = "llmops-gateway-tls";
/// Env var of worker pods with the PEM of the CA that signed the gateway's certificate.
pub const CA_ENV: &str = "LLMOPS_GATEWAY_CA";

/// What the gateway serves with, and what workers trust.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// Server certificate chain (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// The CA workers trust (PEM).
    pub ca_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").field("ca_pem", &self.ca_pem).finish_non_exhaustive()
    }
}

/// The host part of a `host:port` address (or URL): a DNS name or an IP.
pub fn host_of(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or_default().to_string();
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_string()
}

/// Names a generated certificate covers: the advertised host, and loopback (for an
/// operator and workers on one machine).
pub fn names_for(address: &str) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    [host_of(address), "localhost".to_string(), "127.0.0.1".to_string()]
        .into_iter()
        .filter(|n| !n.is_empty() && seen.insert(n.clone()))
        .collect()
}

/// A new CA and a server certificate it signs for `names`, valid for ten years.
pub fn generate(names: &[String]) -> Result<Material> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let year = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).year();
    let validity = |p: &mut CertificateParams| {
        p.not_before = rcgen::date_time_ymd(i32::from(year) - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(i32::from(year) + 10, 1, 1);
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "llmops gateway CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(Material { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: ca.pem() })
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .filter(|s| !s.trim().is_empty())
}

/// The material of a TLS Secret: `tls.crt` and `tls.key`, trusting `ca.crt` (else the
/// certificate itself).
pub fn from_secret(secret: &Secret) -> Result<Material> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let cert_pem = text(secret, "tls.crt").with_context(|| format!("Secret {name} has no tls.crt"))?;
    let key_pem = text(secret, "tls.key").with_context(|| format!("Secret {name} has no tls.key"))?;
    let ca_pem = text(secret, "ca.crt").unwrap_or_else(|| cert_pem.clone());
    if !cert_pem.contains("-----BEGIN CERTIFICATE-----") || !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!("Secret {name}: tls.crt and ca.crt must hold PEM certificates");
    }
    Ok(Material { cert_pem, key_pem, ca_pem })
}

/// The gateway's TLS material as configured: none, a given Secret's, or the generated
/// one (made on first use, and again when the advertised address changes).
pub async fn load(client: &kube::Client, config: &crate::Config) -> Result<Option<Material>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.resolver_namespace);
    match &config.gateway_tls {
        GatewayTls::Off => Ok(None),
        GatewayTls::Secret(name) => {
            let secret = secrets
                .get(name)
                .await
                .with_context(|| format!("reading the gateway's TLS Secret {}/{name}", config.resolver_namespace))?;
            from_secret(&secret).map(Some)
        }
        GatewayTls::Generate => {
            let names = names_for(&config.gateway_address);
            let wanted = names.join(",");
            if let Some(found) = secrets.get_opt(GENERATED_SECRET).await?
                && text(&found, "names").as_deref() == Some(wanted.as_str())
            {
                return from_secret(&found).map(Some);
            }
            let material = generate(&names)?;
            let data = BTreeMap::from([
                ("tls.crt".to_string(), ByteString(material.cert_pem.clone().into_bytes())),
                ("tls.key".to_string(), ByteString(material.key_pem.clone().into_bytes())),
                ("ca.crt".to_string(), ByteString(material.ca_pem.clone().into_bytes())),
                ("names".to_string(), ByteString(wanted.clone().into_bytes())),
            ]);
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(GENERATED_SECRET.into()),
                    namespace: Some(config.resolver_namespace.clone()),
                    labels: Some(BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())])),
                    ..Default::default()
                },
                data: Some(data),
                type_: Some("kubernetes.io/tls".into()),
                ..Default::default()
            };
            let post = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            match secrets.create(&post, &secret).await {
                Ok(_) => Ok(Some(material)),
                // Another replica made one at the same moment: everyone serves that one.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let found = secrets.get(GENERATED_SECRET).await?;
                    if text(&found, "names").as_deref() == Some(wanted.as_str()) {
                        return from_secret(&found).map(Some);
                    }
                    // Made for another address: replace it.
                    secrets
                        .patch(GENERATED_SECRET, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&secret))
                        .await?;
                    Ok(Some(material))
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The tonic server TLS settings of `material`.
pub fn server_config(material: &Material) -> tonic::transport::ServerTlsConfig {
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&material.cert_pem, &material.key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_from_the_advertised_address() {
        assert_eq!(host_of("llmops-gateway.llmops-system.svc:9090"), "llmops-gateway.llmops-system.svc");
        assert_eq!(host_of("https://gw.example:443/"), "gw.example");
        assert_eq!(host_of("10.0.0.7:9090"), "10.0.0.7");
        assert_eq!(host_of("[fd00::7]:9090"), "fd00::7");
        assert_eq!(names_for("127.0.0.1:9090"), ["127.0.0.1", "localhost"]);
        assert_eq!(names_for("gw:1"), ["gw", "localhost", "127.0.0.1"]);
    }

    #[test]
    fn a_generated_certificate_is_signed_by_its_ca_and_reads_back_from_its_secret() {
        let m = generate(&names_for("gw.llmops:9090")).expect("generated");
        assert!(m.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.key_pem.contains("PRIVATE KEY"));
        assert_ne!(m.cert_pem, m.ca_pem);
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(m.cert_pem.clone().into_bytes())),
                ("tls.key".to_string(), ByteString(m.key_pem.clone().into_bytes())),
            ])),
            ..Default::default()
        };
        // Without ca.crt the certificate is its own trust anchor.
        assert_eq!(from_secret(&secret).expect("read").ca_pem, m.cert_pem);
        assert!(format!("{m:?}").contains("ca_pem") && !format!("{m:?}").contains("PRIVATE"), "no key in logs");
        assert!(from_secret(&Secret::default()).is_err());
    }
}
