//! tessera.io/v1alpha1 custom resources.
