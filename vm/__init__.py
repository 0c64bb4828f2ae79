"""ovl-volatile-harness: build, boot and test kernels carrying the reusable-volatile series."""
