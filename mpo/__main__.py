from mpo.cli import main

raise SystemExit(main())
