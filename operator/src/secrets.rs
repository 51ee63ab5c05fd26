//! Secrets a tenant's spec names for the worker to send somewhere (DESIGN.md,
//! "Tenancy"). A user who may create an EvalRun but not read Secrets must not be able
//! to have a worker send any Secret of the namespace to a URL of their choosing, so a
//! Secret reaches a pod as an API key only when it opted in to that use: its
//! annotation [`ALLOWED_URLS`] lists the endpoint URLs its keys may be sent to, set by
//! whoever may write the Secret.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use llmops_crds::SecretKeyRef;

use crate::assignment::api_key_key;
use crate::context::Context;
use crate::controllers::batch::Plan;
use crate::error::Result;
use crate::job::SecretFile;

/// Annotation of a Secret: the base URLs (`https://host[:port]/path`, separated by
/// commas or whitespace) that the API keys it holds may be sent to as bearer tokens.
pub const ALLOWED_URLS: &str = "llmops.dev/allowed-urls";

/// Whether `url` is one of the URLs `allowed` lists: the same URL, ignoring trailing
/// slashes and the case of scheme and host.
pub fn allows(allowed: &str, url: &str) -> bool {
    let wanted = normalize(url);
    !wanted.is_empty()
        && allowed.split([',', ' ', '\n', '\t']).filter(|u| !u.is_empty()).any(|u| normalize(u) == wanted)
}

fn normalize(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let path = if path.is_empty() { String::new() } else { format!("/{path}") };
            format!("{}://{}{path}", scheme.to_ascii_lowercase(), authority.to_ascii_lowercase())
        }
        None => String::new(),
    }
}

/// Why the Secret cannot be used to call `url`, if it cannot. Pure.
pub fn refusal(secret: &Secret, key: &str, url: &str) -> Option<(&'static str, String)> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let annotation = secret.metadata.annotations.as_ref().and_then(|a| a.get(ALLOWED_URLS));
    let Some(allowed) = annotation else {
        return Some((
            "SecretNotAllowed",
            format!(
                "Secret {name} has not opted in to being sent to an endpoint: annotate it with {ALLOWED_URLS}: {url} (done by whoever may write the Secret)"
            ),
        ));
    };
    if !allows(allowed, url) {
        return Some((
            "SecretNotAllowed",
            format!("Secret {name} may be sent only to {allowed} ({ALLOWED_URLS}), not to {url}"),
        ));
    }
    let has_key = secret.data.as_ref().is_some_and(|d| d.contains_key(key))
        || secret.string_data.as_ref().is_some_and(|d| d.contains_key(key));
    if !has_key {
        return Some(("SecretKeyNotFound", format!("Secret {name} has no key {key}")));
    }
    None
}

/// The Secret key `secret` names, as a file for the worker that sends it to `url`; or
/// what to wait for (the Secret is missing, or has not opted in to this URL: both are
/// fixed without changing the spec, so the object waits rather than fails).
pub async fn api_key_for(
    ctx: &Context,
    namespace: &str,
    secret: &SecretKeyRef,
    url: &str,
) -> Result<std::result::Result<SecretFile, Plan>> {
    let key = api_key_key(secret);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(found) = secrets.get_opt(&secret.name).await? else {
        return Ok(Err(Plan::wait("SecretNotFound", format!("Secret {} does not exist", secret.name))));
    };
    if let Some((reason, message)) = refusal(&found, &key, url) {
        return Ok(Err(Plan::wait(reason, message)));
    }
    Ok(Ok(SecretFile { secret: secret.name.clone(), key }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn secret(annotation: Option<&str>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("judge-key".into()),
                annotations: annotation.map(|a| BTreeMap::from([(ALLOWED_URLS.to_string(), a.to_string())])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("api-key".to_string(), ByteString(b"sk-1".to_vec()))])),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_secret_that_opted_in_to_the_url_is_sent() {
        let url = "https://api.example.com/v1";
        let (reason, message) = refusal(&secret(None), "api-key", url).expect("refused");
        assert_eq!(reason, "SecretNotAllowed");
        assert!(message.contains(ALLOWED_URLS), "{message}");
        let (_, message) = refusal(&secret(Some("https://other.example.com/v1")), "api-key", url).expect("refused");
        assert!(message.contains("not to https://api.example.com/v1"), "{message}");
        assert_eq!(refusal(&secret(Some("https://API.example.com/v1/")), "api-key", url), None);
        assert_eq!(refusal(&secret(Some("http://a:8000/v1, https://api.example.com/v1")), "api-key", url), None);
        let (reason, _) = refusal(&secret(Some(url)), "token", url).expect("refused");
        assert_eq!(reason, "SecretKeyNotFound");
    }

    #[test]
    fn urls_match_whole_not_by_prefix() {
        assert!(allows("https://api.example.com/v1", "https://api.example.com/v1/"));
        assert!(!allows("https://api.example.com", "https://api.example.com.evil.io/v1"));
        assert!(!allows("https://api.example.com/v1", "https://api.example.com/v1/../../steal"));
        assert!(!allows("https://api.example.com/v1", "http://api.example.com/v1"));
        assert!(!allows("", "https://api.example.com/v1"));
        assert!(!allows("https://api.example.com/v1", ""));
    }
}
