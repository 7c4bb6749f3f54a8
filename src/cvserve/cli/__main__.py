from cvserve.cli import main

raise SystemExit(main())
