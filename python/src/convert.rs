//! JSON values and Python objects.
//!
//! Sessions are flat JSON objects; their values cross into Python as
//! `None`, `bool`, `int`, `float`, `str`, `list` and `dict`, and come back
//! the same way (a `tuple` becomes a list). Anything else is refused with
//! `InvalidInputError`, so nothing is stored that the Rust side could not
//! read back.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};
use vedfolnir_sessions::Record;

use crate::errors::invalid;

/// Nesting deeper than this is refused (a cycle would never end).
const MAX_DEPTH: usize = 128;

/// A JSON value as a Python object.
pub(crate) fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                PyFloat::new(py, n.as_f64().unwrap_or(f64::NAN)).into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(o) => map_to_py(py, o)?.into_any(),
    })
}

/// A JSON object as a Python dict.
pub(crate) fn map_to_py<'py>(
    py: Python<'py>,
    m: &Map<String, Value>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in m {
        d.set_item(k, to_py(py, v)?)?;
    }
    Ok(d)
}

/// A session as the dict of its stored JSON: its fields and `_version`.
pub(crate) fn session_to_py<'py>(py: Python<'py>, s: &Record) -> PyResult<Bound<'py, PyDict>> {
    let d = map_to_py(py, s.data())?;
    d.set_item("_version", s.version())?;
    Ok(d)
}

fn from_py_at(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(invalid("a value nested more than 128 levels deep"));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // `bool` is a subclass of `int`: test it first.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(invalid("an integer outside the 64-bit range"));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| invalid("NaN and infinities are not JSON"));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        return dict_from_py_at(d, depth + 1).map(Value::Object);
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return l
            .iter()
            .map(|x| from_py_at(&x, depth + 1))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t
            .iter()
            .map(|x| from_py_at(&x, depth + 1))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    let type_name = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned());
    Err(invalid(format!(
        "a value of type {type_name} is not JSON (use None, bool, int, float, str, list or dict)"
    )))
}

/// A Python dict with `str` keys as a JSON object.
pub(crate) fn dict_from_py(d: &Bound<'_, PyDict>) -> PyResult<Map<String, Value>> {
    dict_from_py_at(d, 0)
}

fn dict_from_py_at(d: &Bound<'_, PyDict>, depth: usize) -> PyResult<Map<String, Value>> {
    let mut m = Map::new();
    for (k, v) in d.iter() {
        let Ok(k) = k.cast::<PyString>() else {
            return Err(invalid("session keys are strings"));
        };
        m.insert(k.to_cow()?.into_owned(), from_py_at(&v, depth)?);
    }
    Ok(m)
}
