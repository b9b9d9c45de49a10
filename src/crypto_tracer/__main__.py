from crypto_tracer.cli import main

raise SystemExit(main())
