//! The exception tree: every failure and every refusal of the library becomes one subclass of
//! `PlaygroundError`, chosen by its stable code, with `code` and the details as attributes.

use prpm_playground_core::Error;
use prpm_playground_core::ledger::Rejection;
use prpm_playground_core::pricing::micros_to_usd;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(_native, PlaygroundError, PyException, "Every error of prpm_playground; `code` is the library's stable code.");
create_exception!(_native, InsufficientCredits, PlaygroundError, "Not enough credits (or credits owed): `needed`, `available`.");
create_exception!(_native, RateLimited, PlaygroundError, "The tier's hourly request limit is reached: `limit`, `retry_after_ms`.");
create_exception!(_native, Throttled, PlaygroundError, "The account is throttled: `reason`.");
create_exception!(
    _native,
    CostLimitExceeded,
    Throttled,
    "The run would pass a daily or monthly cost limit: `limit_usd`, `spent_usd`, `held_usd`, `requested_usd`."
);
create_exception!(_native, NotFound, PlaygroundError, "An unknown account, hold, database or record.");
create_exception!(_native, Conflict, PlaygroundError, "A key reused for another request, or a state that forbids the step.");
create_exception!(_native, InvalidInput, PlaygroundError, "A bad argument: `field` names it.");
create_exception!(_native, RequestTooLarge, InvalidInput, "A request over the cap: `tokens`, `cap_tokens`.");
create_exception!(_native, Backend, PlaygroundError, "The database failed, is not ours, or is closed.");
create_exception!(_native, ReadOnly, PlaygroundError, "A write on a store opened read-only.");

/// What a binding call can fail with.
#[derive(Debug)]
pub enum PlayError {
    Core(Error),
    Rejected(Rejection),
    /// A write on a read-only store (the operation's name).
    ReadOnly(&'static str),
    /// A bad Python argument the core never sees.
    Invalid {
        field: &'static str,
        reason: String,
    },
    Py(PyErr),
}

pub type PlayResult<T> = Result<T, PlayError>;

impl From<Error> for PlayError {
    fn from(e: Error) -> Self {
        PlayError::Core(e)
    }
}

impl From<Rejection> for PlayError {
    fn from(r: Rejection) -> Self {
        PlayError::Rejected(r)
    }
}

impl From<PyErr> for PlayError {
    fn from(e: PyErr) -> Self {
        PlayError::Py(e)
    }
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> PlayError {
    PlayError::Invalid { field, reason: reason.into() }
}

/// The one mapping from the library's errors and refusals to the exception tree.
impl From<PlayError> for PyErr {
    fn from(e: PlayError) -> PyErr {
        Python::attach(|py| build(py, e))
    }
}

fn build(py: Python<'_>, e: PlayError) -> PyErr {
    let message = match &e {
        PlayError::Core(e) => e.to_string(),
        PlayError::Rejected(r) => r.to_string(),
        PlayError::ReadOnly(op) => format!("{op}: the store is open read-only (open it with writable=True)"),
        PlayError::Invalid { field, reason } => format!("invalid input: {field}: {reason}"),
        PlayError::Py(_) => String::new(),
    };
    let attrs = PyDict::new(py);
    macro_rules! set {
        ($k:expr, $v:expr) => {
            attrs.set_item($k, $v).expect("a dict takes any value")
        };
    }
    let err = match e {
        PlayError::Py(err) => return err,
        PlayError::ReadOnly(_) => {
            set!("code", "read_only");
            PyErr::new::<ReadOnly, _>(message)
        }
        PlayError::Invalid { field, .. } => {
            set!("code", "invalid_input");
            set!("field", field);
            PyErr::new::<InvalidInput, _>(message)
        }
        PlayError::Core(e) => {
            set!("code", e.code());
            match &e {
                Error::InvalidInput { field, .. } => {
                    set!("field", field);
                    PyErr::new::<InvalidInput, _>(message)
                }
                Error::RequestTooLarge { tokens, cap_tokens } => {
                    set!("tokens", tokens);
                    set!("cap_tokens", cap_tokens);
                    PyErr::new::<RequestTooLarge, _>(message)
                }
                Error::UnknownModel(_) | Error::PriceTable(_) | Error::InvalidSignature(_) => PyErr::new::<InvalidInput, _>(message),
                Error::UnknownAccount(_) | Error::NotFound { .. } => PyErr::new::<NotFound, _>(message),
                Error::IdempotencyConflict { .. } => PyErr::new::<Conflict, _>(message),
                Error::NotOurDatabase(_)
                | Error::SchemaTooNew { .. }
                | Error::Invariant(_)
                | Error::Backend(_)
                | Error::ConnectionLost(_)
                | Error::Closed
                | Error::Stripe { .. } => PyErr::new::<Backend, _>(message),
                _ => PyErr::new::<PlaygroundError, _>(message),
            }
        }
        PlayError::Rejected(r) => {
            set!("code", r.code());
            match &r {
                Rejection::InsufficientCredits { needed, available } => {
                    set!("needed", needed);
                    set!("available", available);
                    PyErr::new::<InsufficientCredits, _>(message)
                }
                Rejection::InDebt { credits } => {
                    set!("needed", credits);
                    set!("available", 0i64);
                    PyErr::new::<InsufficientCredits, _>(message)
                }
                Rejection::RateLimited { limit, retry_after_ms } => {
                    set!("limit", limit);
                    set!("retry_after_ms", retry_after_ms);
                    PyErr::new::<RateLimited, _>(message)
                }
                Rejection::Throttled { reason } => {
                    set!("reason", reason.code());
                    PyErr::new::<Throttled, _>(message)
                }
                Rejection::DailyCostLimit { limit_micros, spent_micros, held_micros, requested_micros }
                | Rejection::MonthlyCostLimit { limit_micros, spent_micros, held_micros, requested_micros } => {
                    set!("reason", r.code());
                    set!("limit_usd", micros_to_usd(*limit_micros));
                    set!("spent_usd", micros_to_usd(*spent_micros));
                    set!("held_usd", micros_to_usd(*held_micros));
                    set!("requested_usd", micros_to_usd(*requested_micros));
                    PyErr::new::<CostLimitExceeded, _>(message)
                }
                Rejection::UnknownHold(_) => PyErr::new::<NotFound, _>(message),
                Rejection::NotACharge(_) | Rejection::RefundExceedsCharge { .. } => PyErr::new::<InvalidInput, _>(message),
                Rejection::AccountExists
                | Rejection::AlreadySettled(_)
                | Rejection::AlreadyReleased(_)
                | Rejection::HoldExpired(_)
                | Rejection::HoldsOpen
                | Rejection::NothingDue
                | Rejection::NotThrottled
                | Rejection::AlreadyThrottled => PyErr::new::<Conflict, _>(message),
            }
        }
    };
    let value = err.value(py);
    for (k, v) in attrs.iter() {
        // Setting an attribute on an exception instance cannot fail for these names.
        let _ = value.setattr(k.cast::<pyo3::types::PyString>().expect("string keys"), v);
    }
    err
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PlaygroundError", py.get_type::<PlaygroundError>())?;
    m.add("InsufficientCredits", py.get_type::<InsufficientCredits>())?;
    m.add("RateLimited", py.get_type::<RateLimited>())?;
    m.add("Throttled", py.get_type::<Throttled>())?;
    m.add("CostLimitExceeded", py.get_type::<CostLimitExceeded>())?;
    m.add("NotFound", py.get_type::<NotFound>())?;
    m.add("Conflict", py.get_type::<Conflict>())?;
    m.add("InvalidInput", py.get_type::<InvalidInput>())?;
    m.add("RequestTooLarge", py.get_type::<RequestTooLarge>())?;
    m.add("Backend", py.get_type::<Backend>())?;
    m.add("ReadOnly", py.get_type::<ReadOnly>())?;
    Ok(())
}
