//! Writes `include/pagemig.h` from the C ABI with cbindgen.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=src/lib.rs");
    let config = cbindgen::Config {
        language: cbindgen::Language::C,
        include_guard: Some("PAGEMIG_H".into()),
        header: Some(
            "/* pagemig: batched page migration between NUMA nodes, from user space.\n * Generated from capi/src/lib.rs by cbindgen: do not edit. */"
                .into(),
        ),
        sys_includes: vec!["stddef.h".into()],
        no_includes: false,
        documentation: true,
        cpp_compat: true,
        style: cbindgen::Style::Tag,
        ..Default::default()
    };
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("generating pagemig.h")
        .write_to_file(format!("{dir}/include/pagemig.h"));
}
