"""User-level differential privacy: DP iALS (:mod:`jaxreco.privacy.dp_ials`) and its
privacy accounting by ``dp-accounting`` (:mod:`jaxreco.privacy.accounting`)."""
