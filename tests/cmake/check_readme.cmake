# cmake -DREADME=<README.md> -DEXAMPLE=<examples/readme_example.cpp> -P check_readme.cmake
#
# Passes when one ```cpp code block of the README is exactly the example's source, so that the
# README shows code that is compiled and run by the tests (ctest: readme_example).

cmake_minimum_required(VERSION 3.22)

foreach(var IN ITEMS README EXAMPLE)
  if(NOT EXISTS "${${var}}")
    message(FATAL_ERROR "check_readme: ${var}='${${var}}' does not exist")
  endif()
endforeach()

file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(REPLACE "\r\n" "\n" readme "${readme}")
string(REPLACE "\r\n" "\n" example "${example}")
string(REGEX REPLACE "\n+$" "" example "${example}")

set(fence_open "```cpp\n")
set(fence_close "\n```")
set(rest "${readme}")
set(blocks 0)
while(TRUE)
  string(FIND "${rest}" "${fence_open}" open)
  if(open EQUAL -1)
    break()
  endif()
  string(LENGTH "${fence_open}" open_length)
  math(EXPR begin "${open} + ${open_length}")
  string(SUBSTRING "${rest}" ${begin} -1 rest)
  string(FIND "${rest}" "${fence_close}" close)
  if(close EQUAL -1)
    message(FATAL_ERROR "check_readme: ${README} has a ```cpp block that is never closed")
  endif()
  string(SUBSTRING "${rest}" 0 ${close} block)
  math(EXPR blocks "${blocks} + 1")
  if(block STREQUAL example)
    message(STATUS "check_readme: code block ${blocks} of README.md is ${EXAMPLE}")
    return()
  endif()
  string(SUBSTRING "${rest}" ${close} -1 rest)
endwhile()

message(FATAL_ERROR
  "check_readme: none of the ${blocks} ```cpp blocks of ${README} is exactly ${EXAMPLE}.\n"
  "Copy the file into the README's usage example (or the other way round); they must stay identical.")
