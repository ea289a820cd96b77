from poisonguard.cli import main

raise SystemExit(main())
