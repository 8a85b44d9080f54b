from lepton_mesh.cli import main

raise SystemExit(main())
