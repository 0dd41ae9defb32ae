//! The experiments and the report behind the `pagemig` command: whole migrations measured
//! and checked ([`experiment`]), and the RFC's experiments written out as tables, JSON,
//! plots and HTML ([`report`]).
//!
//! This crate is the command-line tool's; a program that migrates memory depends on the
//! `pagemig` library alone.
#![deny(unsafe_code, missing_docs, unsafe_op_in_unsafe_fn)]

pub mod experiment;
pub mod report;
