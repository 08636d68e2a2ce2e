"""Dataset readers behind `tfsplit.data`: one module per source format.

Use `tfsplit.data.load_arrays` and `tfsplit.data.build_datasets`; these modules are the readers
they dispatch to (`cifar`, `fashion_mnist`, `stl10`, `image_folder`) and the pieces they share
(`common`). The embedded synthetic set lives in `tfsplit.synthetic`.
"""
