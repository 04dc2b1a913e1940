from esclab.cli import main

main()
