//! OCI image import into containerd 1.6.
