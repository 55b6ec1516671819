from pyhcs._cli import main

main()
