//! consent-control-plane: consentd and consentctl.
