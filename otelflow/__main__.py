from otelflow.cli import main

raise SystemExit(main())
