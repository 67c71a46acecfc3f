from llamalaunch.cli import main

main()
