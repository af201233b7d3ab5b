from leadloop.cli import main

main()
