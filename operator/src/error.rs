//! Errors of a reconcile, each with a stable category: the category is the reason of
//! the Kubernetes event that reports the error and the label of the error metric.

/// Why a reconcile failed. Problems with the user's spec or with referenced objects are
/// not errors: they become conditions. These are the failures that are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object lacks something every stored object has (name, namespace, uid).
    #[error("object without {0}")]
    MissingMetadata(&'static str),
    /// Serializing or parsing an object or an Assignment failed.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    /// The Assignment the operator built does not pass the protocol's validation; a bug
    /// in the builder, reported instead of handing the worker something broken.
    #[error("built an invalid assignment: {0}")]
    InvalidAssignment(String),
    /// Random bytes for a token could not be read.
    #[error("token generation: {0}")]
    Random(String),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Stable CamelCase category: the event reason and the `category` metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "ApiConflict",
            Error::Kube(kube::Error::Api(status)) if status.code == 422 => "ApiInvalid",
            Error::Kube(kube::Error::Api(status)) if status.code == 403 => "ApiForbidden",
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "ApiUnavailable",
            Error::MissingMetadata(_) => "MissingMetadata",
            Error::Serialization(_) => "Serialization",
            Error::InvalidAssignment(_) => "InvalidAssignment",
            Error::Random(_) => "TokenGeneration",
            Error::Finalizer(_) => "Finalizer",
        }
    }
}

/// Result of reconcile steps.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_camel_case() {
        let errors = [
            Error::MissingMetadata("uid"),
            Error::InvalidAssignment("x".into()),
            Error::Random("x".into()),
            Error::Finalizer("x".into()),
        ];
        for e in errors {
            let c = e.category();
            assert!(c.chars().next().is_some_and(|ch| ch.is_ascii_uppercase()), "{c}");
            assert!(c.chars().all(|ch| ch.is_ascii_alphanumeric()), "{c}");
        }
    }
}
