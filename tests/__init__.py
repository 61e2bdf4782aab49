"""Makes tests/ a package, so pytest puts the repository root on sys.path rather than tests/ itself
(whose samora_pl/ and data_modules/ folders would otherwise shadow the real packages in spawned processes)."""
