"""The torch-free base every stage stands on: the runtime (errors, atomic files, progress), the params schema, the
models' size arithmetic and the paths that pass between stages. Imports only the standard library and pyyaml."""
