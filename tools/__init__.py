"""tfsplit's command-line programs: thin absl programs over the library, one per console script.

Installed as the package `tfsplit_tools` (from this folder), so no top-level `tools` package lands
in site-packages. `cli` is what every program shares.
"""
