//! Errors: things that went wrong. Expected business outcomes (insufficient credits, unknown
//! hold, ...) are *not* errors: they are [`crate::ledger::Rejection`] values.

/// Every failure the library reports. Each variant has a stable [`Error::code`] that the HTTP
/// and Python layers map to status codes and exception classes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field of a request is out of range or malformed. Nothing was written.
    #[error("invalid input: {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },

    /// The account does not exist.
    #[error("unknown account {0:?}")]
    UnknownAccount(String),

    /// The model is not in the price table.
    #[error("unknown model {0:?}: not in the price table")]
    UnknownModel(String),

    /// The request's input is larger than the configured cap.
    #[error("request too large: {tokens} tokens, the cap is {cap_tokens}")]
    RequestTooLarge { tokens: u64, cap_tokens: u64 },

    /// A price table could not be parsed or failed validation.
    #[error("price table: {0}")]
    PriceTable(String),

    /// The same idempotency key was used before for a different request.
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyConflict { key: String },

    /// The database file is not a prpm-playground database (or not a database at all).
    #[error("not a prpm-playground database: {0}")]
    NotOurDatabase(String),

    /// The database was migrated by a newer version of this library.
    #[error("database schema version {found} is newer than this library supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },

    /// A stored row violates an invariant the code relies on (corruption or a bug).
    #[error("invariant violated: {0}")]
    Invariant(String),

    /// The storage backend failed (I/O, lock timeout, connection lost, ...).
    #[error("storage backend: {0}")]
    Backend(String),

    /// The connection to the database was lost in the middle of an operation. A keyed
    /// command may or may not have been applied: retry it with the same key (the store does so
    /// itself a few times). Same code as [`Error::Backend`].
    #[error("storage backend: connection lost: {0}")]
    ConnectionLost(String),

    /// The thing does not exist, or belongs to someone else (a session of another user is
    /// reported exactly like a missing one).
    #[error("{what} not found")]
    NotFound { what: &'static str },

    /// The model provider failed (see [`crate::provider::ProviderError`]). Nothing was charged.
    #[cfg(feature = "provider")]
    #[error("provider: {0}")]
    Provider(#[from] crate::provider::ProviderError),

    /// A webhook whose signature does not verify (missing, malformed, wrong, stale). Nothing
    /// was changed.
    #[error("invalid webhook signature: {0}")]
    InvalidSignature(String),

    /// A Stripe API call failed. `code`: `payment_declined`, `stripe_rate_limited`,
    /// `stripe_unavailable`, `stripe_auth` or `stripe_error`.
    #[error("stripe: {code}: {message}")]
    Stripe { code: &'static str, message: String },

    /// The store was closed.
    #[error("store is closed")]
    Closed,
}

impl Error {
    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidInput { .. } => "invalid_input",
            Error::UnknownAccount(_) => "unknown_account",
            Error::UnknownModel(_) => "unknown_model",
            Error::RequestTooLarge { .. } => "request_too_large",
            Error::PriceTable(_) => "invalid_price_table",
            Error::IdempotencyConflict { .. } => "idempotency_conflict",
            Error::NotOurDatabase(_) => "not_our_database",
            Error::SchemaTooNew { .. } => "schema_too_new",
            Error::Invariant(_) => "invariant_violated",
            Error::Backend(_) | Error::ConnectionLost(_) => "backend",
            Error::NotFound { .. } => "not_found",
            #[cfg(feature = "provider")]
            Error::Provider(e) => e.code(),
            Error::InvalidSignature(_) => "invalid_signature",
            Error::Stripe { code, .. } => code,
            Error::Closed => "closed",
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput { field, reason: reason.into() }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Backend(format!("sqlite: {e}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
