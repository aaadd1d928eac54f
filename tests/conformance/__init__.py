"""The provider conformance suite: one set of tests run against every backend (see
``conftest.py`` for the backends and ``test_provider_contract.py`` for the contract)."""
