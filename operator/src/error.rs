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

/// A step of the reconcile pipeline: dereference (read what the object points at) ->
/// validate (pure) -> build (pure: the desired objects) -> apply -> update status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Reading referenced and owned objects.
    Dereference,
    /// Checking the spec against what it references.
    Validate,
    /// Building the desired objects.
    Build,
    /// Server-side applying owned objects.
    Apply,
    /// Writing the status.
    UpdateStatus,
}

impl Step {
    /// CamelCase name of the step.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Dereference => "Dereference",
            Step::Validate => "Validate",
            Step::Build => "Build",
            Step::Apply => "Apply",
            Step::UpdateStatus => "UpdateStatus",
        }
    }
}

/// A failed reconcile: the step that failed and why, one variant per step (so the event
/// reason and the metric label say which step it was).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading referenced or owned objects failed.
    #[error("dereference: {source}")]
    Dereference {
        /// The cause.
        source: Error,
    },
    /// Validating the spec failed for a reason other than the spec itself.
    #[error("validate: {source}")]
    Validate {
        /// The cause.
        source: Error,
    },
    /// Building the desired objects failed.
    #[error("build: {source}")]
    Build {
        /// The cause.
        source: Error,
    },
    /// Applying owned objects failed.
    #[error("apply: {source}")]
    Apply {
        /// The cause.
        source: Error,
    },
    /// Writing the status failed.
    #[error("update status: {source}")]
    UpdateStatus {
        /// The cause.
        source: Error,
    },
}

impl ReconcileError {
    /// Wraps `source` as a failure of `step`.
    pub fn at(step: Step, source: impl Into<Error>) -> Self {
        let source = source.into();
        match step {
            Step::Dereference => Self::Dereference { source },
            Step::Validate => Self::Validate { source },
            Step::Build => Self::Build { source },
            Step::Apply => Self::Apply { source },
            Step::UpdateStatus => Self::UpdateStatus { source },
        }
    }

    /// The step that failed.
    pub fn step(&self) -> Step {
        match self {
            Self::Dereference { .. } => Step::Dereference,
            Self::Validate { .. } => Step::Validate,
            Self::Build { .. } => Step::Build,
            Self::Apply { .. } => Step::Apply,
            Self::UpdateStatus { .. } => Step::UpdateStatus,
        }
    }

    /// The underlying error.
    pub fn source_error(&self) -> &Error {
        match self {
            Self::Dereference { source }
            | Self::Validate { source }
            | Self::Build { source }
            | Self::Apply { source }
            | Self::UpdateStatus { source } => source,
        }
    }

    /// The event reason: the step and the category, e.g. `ApplyApiConflict`.
    pub fn reason(&self) -> String {
        format!("{}{}", self.step().as_str(), self.source_error().category())
    }
}

/// Attaches the step to errors of a reconcile step.
pub trait AtStep<T> {
    /// Marks an error as a failure of `step`.
    fn at(self, step: Step) -> std::result::Result<T, ReconcileError>;
}

impl<T, E: Into<Error>> AtStep<T> for std::result::Result<T, E> {
    fn at(self, step: Step) -> std::result::Result<T, ReconcileError> {
        self.map_err(|e| ReconcileError::at(step, e))
    }
}

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

    #[test]
    fn a_step_error_names_its_step_in_the_reason() {
        let e = ReconcileError::at(Step::Apply, Error::MissingMetadata("uid"));
        assert_eq!(e.step(), Step::Apply);
        assert_eq!(e.reason(), "ApplyMissingMetadata");
        let r: std::result::Result<(), Error> = Err(Error::Random("x".into()));
        assert_eq!(r.at(Step::UpdateStatus).err().map(|e| e.reason()).as_deref(), Some("UpdateStatusTokenGeneration"));
    }
}
