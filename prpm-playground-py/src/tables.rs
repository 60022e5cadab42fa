//! Arrow tables and their export through the Arrow PyCapsule interface
//! (`__arrow_c_stream__`): pyarrow, pandas and polars read them without going through Python
//! objects. Money is `decimal128` (micro-dollars at scale 6, cents at scale 2), never floats;
//! times are millisecond timestamps in UTC; days are `date32`.

use std::ffi::CStr;
use std::sync::Arc;

use arrow_array::ffi::FFI_ArrowSchema;
use arrow_array::ffi_stream::FFI_ArrowArrayStream;
use arrow_array::{ArrayRef, BooleanArray, Date32Array, Decimal128Array, Int64Array, RecordBatch, RecordBatchIterator, StringArray, TimestampMillisecondArray};
use arrow_schema::{ArrowError, Field, Schema, SchemaRef};
use chrono::{DateTime, NaiveDate, Utc};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use rust_decimal::Decimal;

/// Decimal precision of money columns (micro-dollars of an `i64` fit in 19 digits).
const MONEY_PRECISION: u8 = 20;

/// Columns of one record batch, built row-wise by closures over the rows.
pub struct Columns<'a, T> {
    rows: &'a [T],
    fields: Vec<Field>,
    arrays: Vec<ArrayRef>,
}

impl<'a, T> Columns<'a, T> {
    pub fn new(rows: &'a [T]) -> Self {
        Columns { rows, fields: Vec::new(), arrays: Vec::new() }
    }

    fn push(mut self, name: &str, array: ArrayRef) -> Self {
        self.fields.push(Field::new(name, array.data_type().clone(), true));
        self.arrays.push(array);
        self
    }

    pub fn str(self, name: &str, f: impl Fn(&T) -> &str) -> Self {
        let a = StringArray::from_iter_values(self.rows.iter().map(f));
        self.push(name, Arc::new(a))
    }

    pub fn opt_str(self, name: &str, f: impl Fn(&T) -> Option<&str>) -> Self {
        let a: StringArray = self.rows.iter().map(f).collect();
        self.push(name, Arc::new(a))
    }

    pub fn int(self, name: &str, f: impl Fn(&T) -> i64) -> Self {
        let a: Int64Array = self.rows.iter().map(f).map(Some).collect();
        self.push(name, Arc::new(a))
    }

    pub fn opt_int(self, name: &str, f: impl Fn(&T) -> Option<i64>) -> Self {
        let a: Int64Array = self.rows.iter().map(f).collect();
        self.push(name, Arc::new(a))
    }

    pub fn bool(self, name: &str, f: impl Fn(&T) -> bool) -> Self {
        let a: BooleanArray = self.rows.iter().map(f).map(Some).collect();
        self.push(name, Arc::new(a))
    }

    /// USD from micro-dollars: `decimal128(20, 6)`.
    pub fn usd(self, name: &str, f: impl Fn(&T) -> i64) -> Self {
        self.opt_usd(name, |r| Some(f(r)))
    }

    pub fn opt_usd(self, name: &str, f: impl Fn(&T) -> Option<i64>) -> Self {
        let a: Decimal128Array = self.rows.iter().map(|r| f(r).map(i128::from)).collect();
        let a = a.with_precision_and_scale(MONEY_PRECISION, 6).expect("valid precision and scale");
        self.push(name, Arc::new(a))
    }

    /// USD from cents: `decimal128(20, 2)`.
    pub fn usd_cents(self, name: &str, f: impl Fn(&T) -> i64) -> Self {
        let a: Decimal128Array = self.rows.iter().map(|r| Some(i128::from(f(r)))).collect();
        let a = a.with_precision_and_scale(MONEY_PRECISION, 2).expect("valid precision and scale");
        self.push(name, Arc::new(a))
    }

    /// A decimal at `scale` (a percentage with one decimal): `decimal128(12, scale)`.
    pub fn opt_decimal(self, name: &str, scale: u32, f: impl Fn(&T) -> Option<Decimal>) -> Self {
        let a: Decimal128Array = self
            .rows
            .iter()
            .map(|r| {
                f(r).map(|mut d| {
                    d.rescale(scale);
                    d.mantissa()
                })
            })
            .collect();
        let a = a.with_precision_and_scale(12, scale as i8).expect("valid precision and scale");
        self.push(name, Arc::new(a))
    }

    pub fn time(self, name: &str, f: impl Fn(&T) -> DateTime<Utc>) -> Self {
        self.opt_time(name, |r| Some(f(r)))
    }

    pub fn opt_time(self, name: &str, f: impl Fn(&T) -> Option<DateTime<Utc>>) -> Self {
        let a: TimestampMillisecondArray = self.rows.iter().map(|r| f(r).map(|t| t.timestamp_millis())).collect();
        self.push(name, Arc::new(a.with_timezone("UTC")))
    }

    pub fn date(self, name: &str, f: impl Fn(&T) -> NaiveDate) -> Self {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("the epoch");
        let a: Date32Array = self.rows.iter().map(|r| Some((f(r) - epoch).num_days() as i32)).collect();
        self.push(name, Arc::new(a))
    }

    pub fn batch(self) -> RecordBatch {
        RecordBatch::try_new(Arc::new(Schema::new(self.fields)), self.arrays).expect("columns of one length")
    }
}

/// An immutable table: record batches of one schema. Export it with `__arrow_c_stream__`
/// (every call streams the same batches again), or convert it with `to_pyarrow()`,
/// `to_pandas()` or `to_polars()`.
#[pyclass(module = "prpm_playground._native", frozen)]
pub struct Table {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl Table {
    /// A table of these batches; at least one (possibly empty) batch gives the schema.
    pub fn new(batches: Vec<RecordBatch>) -> Table {
        let schema = batches.first().expect("at least one batch").schema();
        let batches = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        Table { schema, batches }
    }
}

const STREAM: &CStr = c"arrow_array_stream";
const SCHEMA: &CStr = c"arrow_schema";

#[pymethods]
impl Table {
    /// The Arrow PyCapsule stream export. `requested_schema` is accepted and ignored (the
    /// interface lets a producer keep its own schema).
    #[pyo3(signature = (requested_schema = None))]
    fn __arrow_c_stream__<'py>(&self, py: Python<'py>, requested_schema: Option<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema;
        let batches: Vec<Result<RecordBatch, ArrowError>> = self.batches.iter().cloned().map(Ok).collect();
        let reader = RecordBatchIterator::new(batches, self.schema.clone());
        let stream = FFI_ArrowArrayStream::new(Box::new(reader));
        PyCapsule::new_with_value(py, stream, STREAM)
    }

    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        let schema = FFI_ArrowSchema::try_from(self.schema.as_ref()).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
        PyCapsule::new_with_value(py, schema, SCHEMA)
    }

    #[getter]
    fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    #[getter]
    fn column_names(&self) -> Vec<String> {
        self.schema.fields().iter().map(|f| f.name().clone()).collect()
    }

    fn __len__(&self) -> usize {
        self.num_rows()
    }

    fn __repr__(&self) -> String {
        let cols: Vec<String> = self.schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect();
        format!("Table({} rows; {})", self.num_rows(), cols.join(", "))
    }

    /// A `pyarrow.Table` (needs pyarrow).
    fn to_pyarrow<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py().import("pyarrow")?.call_method1("table", (slf,))
    }

    /// A `pandas.DataFrame` (needs pandas and pyarrow; money stays `decimal.Decimal`).
    fn to_pandas<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Table::to_pyarrow(slf)?.call_method0("to_pandas")
    }

    /// A `polars.DataFrame` (needs polars).
    fn to_polars<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py().import("polars")?.call_method1("DataFrame", (slf,))
    }
}
